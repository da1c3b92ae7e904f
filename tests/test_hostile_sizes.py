"""A warehouse may be written by more than the pipeline: no size it holds or declares makes `pull` (or the
serve follower, which pulls) read or write unbounded bytes.

On a local warehouse and on S3 (moto and SeaweedFS): an oversized LATEST or manifest is refused before it
is read whole; a file object larger than its manifest entry is refused before anything past the declared
size reaches the disk; a manifest declaring more than the free disk is refused before any download. After
every refusal `current` still names the snapshot it named, and no `.partial-*` staging folder is left.
CATALOG_INDEX_CHAOS=N runs the property N times as long.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from conftest import new_bucket, written_bytes
from pipelines.cli import main as cli_main
from pipelines.client import InsufficientSpace, current_snapshot_id, pull
from pipelines.config import IndexSettings, load_settings
from pipelines.index import build_index
from pipelines.layout import hold_key, latest_key, snapshot_prefix
from pipelines.publish import apply_retention, hold, publish_snapshot, rollback
from pipelines.serve.live import LiveSnapshot
from pipelines.serve.metrics import ServiceMetrics
from pipelines.serve.settings import ServeSettings
from pipelines.snapshot import (LATEST_MAX_BYTES, MANIFEST_FILE, MANIFEST_MAX_BYTES, PointerInvalid,
                                SnapshotVerificationError, manifest_bytes, read_latest)
from pipelines.storage import TEXT_MAX_BYTES, LocalStorage, open_storage
from synthetic_catalog import MODEL, write_catalog

CHAOS = int(os.environ.get("CATALOG_INDEX_CHAOS", "1"))
CFG = IndexSettings(max_vectors_per_shard=60, flat_max_vectors=1000, recall_queries=10)
FORGED_IDS = (f"29990101T{n:06d}.000Z-beef" for n in itertools.count())
PEAK_MEMORY = 24 << 20   # what a pull may allocate at its peak: opening a boto3 client alone takes ~14 MB


class Warehouse:
    """One published snapshot (`first`) in a real warehouse, and what someone else with write access to it can do."""

    def __init__(self, uri: str, s3=None):
        self.uri, self.s3 = uri, s3
        self.storage = open_storage(uri, s3)
        write_catalog(self.storage, "r1", {"food": 50, "tools": 40})
        settings = load_settings(warehouse=uri, **({"s3": s3.model_dump()} if s3 else {}))
        built = build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local")
        self.first = publish_snapshot(self.storage, "catalog", snapshot_id=built.snapshot_id).snapshot_id
        self.latest = self.storage.read_bytes(latest_key("catalog"))
        self.manifest = json.loads(self.storage.read_bytes(snapshot_prefix("catalog", self.first) + MANIFEST_FILE))
        self.forged: list[str] = []

    def pull(self, dest):
        return pull(self.uri, dest, s3=self.s3)

    def forge(self, *, objects: dict | None = None, edit=None, manifest_size: int | None = None) -> str:
        """A new snapshot copied from `first`, with `objects` ({path: size}) replaced by objects of that size,
        `edit` applied to its manifest, the manifest padded to `manifest_size`; LATEST names it, with the
        right sha256 (whoever can write the warehouse can compute one)."""
        snapshot_id = next(FORGED_IDS)
        self.forged.append(snapshot_id)
        source, prefix = snapshot_prefix("catalog", self.first), snapshot_prefix("catalog", snapshot_id)
        manifest = json.loads(json.dumps(self.manifest))
        manifest["snapshot_id"] = snapshot_id
        for record in manifest["files"]:
            record["key"] = prefix + record["path"]
            if record["path"] in (objects or {}):
                self.write_large(prefix + record["path"], objects[record["path"]])
            else:
                self.storage.write_bytes(prefix + record["path"], self.storage.read_bytes(source + record["path"]))
        if edit:
            edit(manifest)
        data = manifest_bytes(manifest)
        if manifest_size:
            self.write_large(prefix + MANIFEST_FILE, manifest_size, head=data, fill=b" ")   # valid JSON on S3
            digest = self.sha256(prefix + MANIFEST_FILE)
        else:
            self.storage.write_bytes(prefix + MANIFEST_FILE, data)
            digest = hashlib.sha256(data).hexdigest()
        self.point_latest(snapshot_id, digest)
        return snapshot_id

    def point_latest(self, snapshot_id: str, digest: str | None, size: int | None = None) -> None:
        pointer = json.dumps({"snapshot_id": snapshot_id, "manifest_sha256": digest, "action": "publish"}).encode()
        if size:
            self.write_large(latest_key("catalog"), size, head=pointer, fill=b" ")
        else:
            self.storage.write_bytes(latest_key("catalog"), pointer)

    def write_large(self, key: str, size: int, head: bytes = b"", fill: bytes = b"\0") -> None:
        """`head`, then `fill` up to `size` bytes: on S3 a real upload (keep it modest), on a local warehouse
        a sparse file (the tail reads as zeros), so it may be as large as anyone likes."""
        if isinstance(self.storage, LocalStorage):
            path = self.storage.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(head)
                fh.truncate(size)
        else:
            self.storage.write_bytes(key, head + fill * (size - len(head)))

    def sha256(self, key: str) -> str:
        hasher = hashlib.sha256()
        with self.storage.open_input(key) as fh:
            for block in iter(lambda: fh.read(8 << 20), b""):
                hasher.update(block)
        return hasher.hexdigest()

    def large(self, local: int, s3: int) -> int:
        """An object size: anything on a local warehouse (sparse), modest on S3 (a real upload)."""
        return local if isinstance(self.storage, LocalStorage) else s3

    def reset(self) -> None:
        self.storage.write_bytes(latest_key("catalog"), self.latest)
        for snapshot_id in self.forged:
            self.storage.delete_prefix(snapshot_prefix("catalog", snapshot_id))
        self.forged.clear()


@pytest.fixture(scope="module", params=["local", "moto", "seaweedfs"])
def warehouse(request, tmp_path_factory):
    """A published snapshot on a local warehouse, on moto and on SeaweedFS (the stores of `s3_bucket`)."""
    if request.param == "local":
        return Warehouse((tmp_path_factory.mktemp("hostile") / "warehouse").as_uri())
    bucket, s3 = new_bucket(request.getfixturevalue(f"{request.param}_endpoint"))
    return Warehouse(f"s3://{bucket}/wh", s3)


@pytest.fixture
def serving(warehouse, tmp_path):
    """A destination whose `current` is the warehouse's verified first snapshot."""
    dest = tmp_path / "serving"
    warehouse.pull(dest)
    yield warehouse, dest
    warehouse.reset()


def assert_untouched(warehouse: Warehouse, dest) -> None:
    """What every refusal leaves: the verified snapshot still current and intact, nothing else on disk."""
    assert current_snapshot_id(dest) == warehouse.first
    assert sorted(p.name for p in (dest / "snapshots").iterdir()) == [warehouse.first]   # no .partial-*, no forged
    assert (dest / "current" / ".verified").is_file()


def test_an_oversized_latest_is_refused_unread_and_rollback_repairs_it(serving):
    warehouse, dest = serving
    size = warehouse.large(10 << 30, 32 << 20)   # a valid pointer, then whitespace (zeros, locally) far past the cap
    warehouse.point_latest(warehouse.first, None, size=size)
    tracemalloc.start()
    try:
        with pytest.raises(PointerInvalid, match=f"larger than the cap of {LATEST_MAX_BYTES:,} bytes.*rollback --to"):
            warehouse.pull(dest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_MEMORY, f"pull held {peak:,} bytes at its peak"
    assert_untouched(warehouse, dest)
    rollback(warehouse.storage, "catalog", warehouse.first)   # what the message says to do: it replaces the pointer
    assert read_latest(warehouse.storage, "catalog")["snapshot_id"] == warehouse.first


def test_an_oversized_manifest_is_refused_before_it_is_read(serving):
    warehouse, dest = serving
    warehouse.forge(manifest_size=MANIFEST_MAX_BYTES + (1 << 20))   # 65 MiB, hashed for LATEST's manifest_sha256
    tracemalloc.start()
    try:
        with pytest.raises(SnapshotVerificationError, match=f"larger than the cap of {MANIFEST_MAX_BYTES:,} bytes"
                                                            ".*damaged or hostile.*rollback") as refused:
            warehouse.pull(dest)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.bad_files == [MANIFEST_FILE]
    assert peak < PEAK_MEMORY, f"pull held {peak:,} bytes at its peak"
    assert_untouched(warehouse, dest)


def test_a_file_larger_than_its_manifest_entry_is_refused_before_it_reaches_the_disk(serving):
    warehouse, dest = serving
    record = next(r for r in warehouse.manifest["files"] if r["role"] == "index")
    warehouse.forge(objects={record["path"]: warehouse.large(200 << 20, 32 << 20)})   # zeros; the manifest says KBs
    before = written_bytes()
    with pytest.raises(SnapshotVerificationError, match="damaged or hostile.*roll back") as refused:
        warehouse.pull(dest)
    written = written_bytes() - before
    assert [bad.split(" ")[0] for bad in refused.value.bad_files] == [record["path"]]
    assert f"manifest says {record['bytes']} bytes" in str(refused.value)
    declared = sum(r["bytes"] for r in warehouse.manifest["files"])
    assert written < declared + (64 << 10), f"pull wrote {written:,} bytes for a snapshot of {declared:,}"
    assert_untouched(warehouse, dest)


@pytest.mark.parametrize("declared", ["free", 10 ** 30])
def test_a_snapshot_larger_than_the_free_disk_is_refused_before_any_download(serving, declared):
    warehouse, dest = serving
    free = shutil.disk_usage(dest).free

    def inflate(manifest):
        manifest["files"][0]["bytes"] = free + 1 if declared == "free" else declared

    warehouse.forge(edit=inflate)
    before = written_bytes()
    with pytest.raises(InsufficientSpace, match=r"needs [\d,]+\.\d GB .*only [\d,]+\.\d GB free at "
                                                r".*: free space or pull elsewhere"):
        warehouse.pull(dest)
    assert written_bytes() - before < 64 << 10   # not one file downloaded
    assert_untouched(warehouse, dest)


LOCAL_ONLY = pytest.mark.parametrize("warehouse", ["local"], indirect=True)   # what does not depend on the store


@LOCAL_ONLY
def test_cli_pull_says_what_to_do_about_a_disk_too_small(serving, capsys):
    warehouse, dest = serving

    def inflate(manifest):
        manifest["files"][0]["bytes"] = 10 ** 18

    warehouse.forge(edit=inflate)
    assert cli_main(["pull", "--warehouse", warehouse.uri, "--dest", str(dest)]) == 2
    assert "free space or pull elsewhere" in capsys.readouterr().err.replace("\n", " ")
    assert_untouched(warehouse, dest)


def following(serving, tmp_path) -> tuple:
    """(warehouse, a serve follower that loaded its first snapshot, the follower's metrics)."""
    warehouse, _ = serving
    metrics = ServiceMetrics()
    live = LiveSnapshot(ServeSettings(warehouse=warehouse.uri, cache_dir=str(tmp_path / "cache")), metrics)
    assert live.check().outcome == "loaded"
    return warehouse, live, metrics


@LOCAL_ONLY
def test_the_serve_follower_counts_an_oversized_file_as_refused_and_keeps_serving(serving, tmp_path):
    warehouse, live, metrics = following(serving, tmp_path)
    record = warehouse.manifest["files"][0]
    forged = warehouse.forge(objects={record["path"]: 1 << 30})
    for _ in range(2):   # the second check finds the refusal remembered: nothing downloaded again
        outcome = live.check()
        assert (outcome.outcome, outcome.snapshot_id) == ("refused", forged) and record["path"] in outcome.detail
        assert live.current.snapshot.snapshot_id == warehouse.first
    assert 'catalog_index_reloads_total{outcome="refused"} 1.0' in metrics.render()[0].decode()
    assert_untouched(warehouse, tmp_path / "cache")


@LOCAL_ONLY
@hsettings(max_examples=25 * CHAOS, deadline=None, derandomize=True, database=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_any_declared_size_other_than_the_real_one_is_refused_and_nothing_past_it_is_written(serving, data):
    """Whichever file, whichever way (the object grows or shrinks, or the manifest says more or less):
    refused, naming that file, `current` unchanged, and never more written than the manifest declares."""
    warehouse, dest = serving
    files = warehouse.manifest["files"]
    record = data.draw(st.sampled_from(files), label="file")
    delta = data.draw(st.integers(-record["bytes"], -1) | st.integers(1, 1 << 20), label="delta")
    if data.draw(st.booleans(), label="the object changes (else the manifest)"):
        warehouse.forge(objects={record["path"]: record["bytes"] + delta})
        declared = sum(r["bytes"] for r in files)
    else:
        def redeclare(manifest):
            next(r for r in manifest["files"] if r["path"] == record["path"])["bytes"] += delta

        warehouse.forge(edit=redeclare)
        declared = sum(r["bytes"] for r in files) + delta
    before = written_bytes()
    try:
        with pytest.raises(SnapshotVerificationError) as refused:
            warehouse.pull(dest)
        assert [bad.split(" ")[0] for bad in refused.value.bad_files] == [record["path"]]
        assert written_bytes() - before <= declared + (64 << 10)
        assert_untouched(warehouse, dest)
    finally:
        warehouse.reset()


@LOCAL_ONLY
def test_the_serve_follower_refuses_a_snapshot_its_disk_cannot_hold_and_tries_again_later(serving, tmp_path):
    warehouse, live, metrics = following(serving, tmp_path)

    def inflate(manifest):
        manifest["files"][0]["bytes"] = 10 ** 18

    forged = warehouse.forge(edit=inflate)
    for attempt in (1, 2):   # not remembered as refused: each check asks the disk again
        outcome = live.check()
        assert (outcome.outcome, outcome.snapshot_id) == ("refused", forged)
        assert "free space or pull elsewhere" in outcome.detail
        assert live.current.snapshot.snapshot_id == warehouse.first
        assert f'catalog_index_reloads_total{{outcome="refused"}} {attempt}.0' in metrics.render()[0].decode()
    assert 'reason="disk_space"' in metrics.render()[0].decode()
    assert_untouched(warehouse, tmp_path / "cache")


def test_retention_keeps_a_snapshot_whose_hold_is_too_large_to_read_and_reads_none_of_it(warehouse):
    """Build-side reads of what others may write (holds, reports, markers) are capped too: a 10 GiB hold
    (65 MiB on S3) is unreadable, so its snapshot is kept, and retention holds at most a few MB meanwhile.
    Once the hold is gone, the same retention deletes that snapshot: the hold is what kept it."""
    victim = warehouse.forge()      # published, not live
    warehouse.forge()               # live; `first` stays held below, so it is never at risk
    hostile = hold_key("catalog", victim, "hostile")
    try:
        with hold(warehouse.storage, "catalog", warehouse.first, "test"):
            head = json.dumps({"snapshot_id": victim, "since": "2026-01-01T00:00:00+00:00"}).encode()
            warehouse.write_large(hostile, warehouse.large(10 << 30, TEXT_MAX_BYTES + (1 << 20)), head=head, fill=b" ")
            tracemalloc.start()
            try:
                deleted = apply_retention(warehouse.storage, "catalog", keep_snapshots=1)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            assert deleted == [] and warehouse.storage.exists(snapshot_prefix("catalog", victim) + MANIFEST_FILE)
            assert peak < PEAK_MEMORY, f"retention held {peak:,} bytes at its peak"
            warehouse.storage.delete(hostile)
            assert apply_retention(warehouse.storage, "catalog", keep_snapshots=1) == [victim]
    finally:
        warehouse.storage.delete(hostile)
        warehouse.reset()
