"""The warehouse interface, on a local directory and on S3 spoken over HTTP (moto server, SeaweedFS)."""
import pyarrow as pa
import pytest

from conftest import new_bucket
from pipelines.config import S3Settings
from pipelines.address_policy import AddressPolicy
from pipelines.storage import LocalStorage, S3Storage, StorageError, open_storage, read_uri_bytes


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
