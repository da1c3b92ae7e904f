"""The warehouse interface, on a local directory and on S3 spoken over HTTP (moto server, SeaweedFS)."""
import pyarrow as pa
import pytest

from conftest import new_bucket, written_bytes
from pipelines.config import S3Settings
from pipelines.address_policy import AddressPolicy
from pipelines.storage import (LocalStorage, ObjectTooLarge, S3Storage, SizeMismatch, StorageError, open_storage,
                               read_uri_bytes)


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(tmp_path.as_uri())
    bucket, settings = new_bucket(request.getfixturevalue(f"{request.param}_endpoint"))
    return open_storage(f"s3://{bucket}/warehouse", settings)


def test_round_trip_list_delete(storage):
    storage.write_bytes("runs/r1/a.bin", b"abc")
    storage.write_text("runs/r1/sub/b.json", "{}")
    storage.write_bytes("runs/r2/c.bin", b"c")
    storage.write_bytes("images/category=food/run_id=r1/part-0.parquet", b"x")
    assert storage.read_bytes("runs/r1/a.bin") == b"abc"
    assert storage.exists("runs/r1/a.bin") and not storage.exists("runs/r1/nope")
    assert storage.list("runs/r1/") == ["runs/r1/a.bin", "runs/r1/sub/b.json"]
    assert storage.list_dirs("runs") == ["r1", "r2"]
    assert storage.list_dirs("images") == ["category=food"]
    assert storage.delete_prefix("runs/r1/") == 2
    assert storage.list("runs/") == ["runs/r2/c.bin"]
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes("runs/r1/a.bin")


def test_parquet_tables(storage):
    schema = pa.schema([("a", pa.int64()), ("b", pa.string())])
    storage.write_table("t/part-0.parquet", pa.table({"a": [1, 2], "b": ["x", "y"]}, schema=schema))
    storage.write_table("t/part-1.parquet", pa.table({"a": [3], "b": ["z"]}, schema=schema))
    assert storage.read_table("t/").column("a").to_pylist() == [1, 2, 3]
    assert storage.read_table("t/part-1.parquet", columns=["b"]).column_names == ["b"]
    assert storage.read_table("empty/", schema=schema).num_rows == 0


def test_large_object_goes_through_multipart(tmp_path, s3_bucket):
    bucket, settings = s3_bucket
    small_parts = S3Settings(endpoint_url=settings.endpoint_url, region="us-east-1",
                             multipart_threshold_mb=5, multipart_chunk_mb=5)
    storage = open_storage(f"s3://{bucket}/mp", small_parts)
    blob = bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MiB: 3 parts
    storage.write_bytes("big.bin", blob)
    head = storage.client.head_object(Bucket=bucket, Key="mp/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag names its part count
    assert storage.read_bytes("big.bin") == blob
    local = tmp_path / "big.bin"
    storage.download_file("big.bin", local)
    assert local.read_bytes() == blob


def test_s3_errors_say_what_to_check(s3_bucket, request):
    _, settings = s3_bucket
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        open_storage("s3://no-such-bucket/x", settings).read_bytes("k")
    if request.node.callspec.params["s3_bucket"] == "moto":   # SeaweedFS creates a bucket on its first write
        with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
            open_storage("s3://no-such-bucket/x", settings).write_bytes("k", b"1")


def test_uris():
    assert isinstance(open_storage("/tmp/wh"), LocalStorage)
    assert isinstance(open_storage("file:///tmp/wh"), LocalStorage)
    s3 = open_storage("s3://bucket/some/prefix")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    for bad in ("gs://bucket/x", "s3:///nobucket", "file://host/path"):
        with pytest.raises(StorageError):
            open_storage(bad)
    with pytest.raises(StorageError):
        LocalStorage("/tmp/wh").read_bytes("../../etc/passwd")


def test_storage_pickles_without_its_client(s3_bucket):
    import pickle
    bucket, settings = s3_bucket
    storage = open_storage(f"s3://{bucket}/p", settings)
    storage.write_bytes("k", b"v")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.read_bytes("k") == b"v"


def test_read_uri_bytes_http_s3_file(tmp_path, s3_bucket, fault_server):
    bucket, settings = s3_bucket
    open_storage(f"s3://{bucket}", settings).write_bytes("dir/m.csv", b"s3 bytes")
    assert read_uri_bytes(f"s3://{bucket}/dir/m.csv", settings) == b"s3 bytes"
    (tmp_path / "m.csv").write_bytes(b"file bytes")
    assert read_uri_bytes(str(tmp_path / "m.csv")) == b"file bytes"
    assert read_uri_bytes((tmp_path / "m.csv").as_uri()) == b"file bytes"
    url = fault_server.put("m.csv", b"http bytes")
    loopback = AddressPolicy(allow_private_hosts=True)
    assert read_uri_bytes(url, policy=loopback) == b"http bytes"
    with pytest.raises(StorageError, match="HTTP 404"):
        read_uri_bytes(fault_server.url("status/404"), policy=loopback)


def test_read_uri_bytes_is_guarded_capped_and_bounded(tmp_path, s3_bucket, fault_server):
    import time

    url = fault_server.put("q.png", b"x" * 5000)
    with pytest.raises(StorageError, match="ssrf_blocked"):  # default policy: public addresses only
        read_uri_bytes(url)
    assert fault_server.log == []
    loopback = AddressPolicy(allow_private_hosts=True)
    with pytest.raises(StorageError, match="cap of 1,000 bytes"):
        read_uri_bytes(url, policy=loopback, max_bytes=1000)
    with pytest.raises(StorageError, match="cap of 1,000 bytes"):
        read_uri_bytes(fault_server.url("gzip-bomb/50"), policy=loopback, max_bytes=1000)
    (tmp_path / "big").write_bytes(b"x" * 5000)
    with pytest.raises(StorageError, match="larger than the cap"):
        read_uri_bytes(str(tmp_path / "big"), max_bytes=1000)
    bucket, settings = s3_bucket
    open_storage(f"s3://{bucket}", settings).write_bytes("big", b"x" * 5000)
    with pytest.raises(StorageError, match="larger than the cap"):
        read_uri_bytes(f"s3://{bucket}/big", settings, max_bytes=1000)
    started = time.monotonic()
    with pytest.raises(StorageError, match="timeout"):
        read_uri_bytes(fault_server.url("trickle-headers"), policy=loopback, timeout_s=1.0)
    assert time.monotonic() - started < 1.0 + 1.5


# -- hostile sizes: a reader that sets a cap never reads past it, a download never writes past its size ------

def test_a_capped_read_refuses_a_larger_object_and_reads_a_smaller_one_whole(storage):
    storage.write_bytes("LATEST", b"x" * 5000)
    storage.write_bytes("empty", b"")
    for read in (storage.read_bytes, storage.read_text, storage.read_versioned):
        with pytest.raises(ObjectTooLarge, match="is larger than the cap of 4,999 bytes"):
            read("LATEST", max_bytes=4999)
    assert storage.read_bytes("LATEST", max_bytes=5000) == b"x" * 5000
    assert storage.read_bytes("empty", max_bytes=10) == b"" == storage.read_versioned("empty", max_bytes=10)[0]
    with pytest.raises(ObjectTooLarge) as refused:   # a rollback may still replace it: the tag comes along
        storage.read_versioned("LATEST", max_bytes=10)
    assert refused.value.version == storage.read_versioned("LATEST")[1]
    storage.write_if("LATEST", b"{}", refused.value.version)
    assert storage.read_bytes("LATEST", max_bytes=10) == b"{}"
    with pytest.raises(StorageError, match="does not exist"):
        storage.read_bytes("nope", max_bytes=10)


def test_a_capped_read_of_a_huge_local_file_reads_nothing_past_the_cap(tmp_path):
    storage = open_storage(tmp_path.as_uri())
    with open(tmp_path / "manifest.json", "wb") as fh:
        fh.truncate(10 << 30)                                  # 10 GiB, sparse: free to make, ruinous to read
    with pytest.raises(ObjectTooLarge, match="cap of 1,024 bytes"):
        storage.read_bytes("manifest.json", max_bytes=1024)
    with pytest.raises(ObjectTooLarge):
        storage.read_versioned("manifest.json", max_bytes=1024 << 20)


def test_a_capped_local_read_of_a_file_that_grows_past_its_checked_size_stops_at_the_cap(tmp_path):
    """A FIFO's size reads 0, then bytes keep coming (a file appended to after its size was checked):
    the read goes on only to the cap + 1, then refuses; a stream that ends within the cap is read whole.
    A text read is capped by default (TEXT_MAX_BYTES) without the caller asking."""
    import os
    import threading

    from pipelines.storage import TEXT_MAX_BYTES

    storage = open_storage(tmp_path.as_uri())
    fed: list[int] = []

    def feed(name: str, size: int) -> threading.Thread:
        os.mkfifo(tmp_path / name)

        def write() -> None:
            try:
                with open(tmp_path / name, "wb") as fh:
                    for start in range(0, size, 1 << 16):
                        fed.append(fh.write(b"y" * min(1 << 16, size - start)))
            except BrokenPipeError:   # the reader stopped: what a capped read must do
                pass

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        return thread

    writer = feed("growing", 50 << 20)
    with pytest.raises(ObjectTooLarge, match="cap of 3,000,000 bytes"):
        storage.read_bytes("growing", max_bytes=3_000_000)
    writer.join(10)
    assert sum(fed) < 3_000_000 + (2 << 20), f"{sum(fed):,} bytes went into a read capped at 3 MB"
    feed("short", 200_000)
    assert storage.read_bytes("short", max_bytes=3_000_000) == b"y" * 200_000
    fed.clear()
    writer = feed("report.json", TEXT_MAX_BYTES + (4 << 20))
    with pytest.raises(ObjectTooLarge, match=f"cap of {TEXT_MAX_BYTES:,} bytes"):
        storage.read_text("report.json")
    writer.join(10)
    assert sum(fed) < TEXT_MAX_BYTES + (3 << 20)


def test_a_download_refuses_another_size_before_writing_anything(storage, tmp_path):
    storage.write_bytes("shards/s.faiss", b"z" * 3000)
    local = tmp_path / "staging" / "s.faiss"
    for expected in (1000, 2999, 3001):
        with pytest.raises(SizeMismatch, match=f"holds 3,000 bytes, not the {expected:,} bytes expected"):
            storage.download_file("shards/s.faiss", local, expected_bytes=expected)
        assert not local.exists()
    storage.download_file("shards/s.faiss", local, expected_bytes=3000)
    assert local.read_bytes() == b"z" * 3000
    storage.write_bytes("shards/empty", b"")
    storage.download_file("shards/empty", tmp_path / "empty", expected_bytes=0)
    assert (tmp_path / "empty").read_bytes() == b""
    with pytest.raises(StorageError, match="does not exist"):
        storage.download_file("shards/nope", local, expected_bytes=1)


def test_an_object_replaced_by_a_larger_one_after_its_size_was_checked_is_not_written_past_its_size(
        s3_bucket, tmp_path):
    """The race a HEAD cannot close: between the size check and the GET, someone swaps in 32 MiB of zeros.
    The transfer stops at the expected size: the local file never grows past it, and is removed."""
    import boto3

    bucket, settings = s3_bucket
    storage = open_storage(f"s3://{bucket}/wh", settings)
    storage.write_bytes("shards/s.faiss", b"z" * 1000)
    other = boto3.client("s3", endpoint_url=settings.endpoint_url, region_name="us-east-1")

    def swap(**_):
        other.put_object(Bucket=bucket, Key="wh/shards/s.faiss", Body=bytes(32 << 20))

    storage.client.meta.events.register_first("after-call.s3.HeadObject", swap)
    local = tmp_path / "s.faiss"
    before = written_bytes()
    with pytest.raises(SizeMismatch, match="more than 1,000 bytes"):
        storage.download_file("shards/s.faiss", local, expected_bytes=1000)
    assert written_bytes() - before < 1 << 20 and not local.exists()


def test_the_test_seaweedfs_has_volumes_for_every_bucket_whatever_the_free_disk(seaweedfs_endpoint):
    """Each bucket takes volumes of its own; a volume limit derived from free disk failed CI part way through
    the suite on a fuller disk. The master must report the fixed limit, not one computed from free space."""
    import json
    import urllib.request

    from conftest import SEAWEEDFS_MASTER, SEAWEEDFS_MAX_VOLUMES

    with urllib.request.urlopen(f"{SEAWEEDFS_MASTER['url']}/dir/status", timeout=10) as response:
        topology = json.load(response)["Topology"]
    assert topology["Max"] == SEAWEEDFS_MAX_VOLUMES
