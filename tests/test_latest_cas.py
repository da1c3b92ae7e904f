"""LATEST moves only by compare-and-swap from the snapshot a build started from; publish is idempotent;
retention keeps what someone may still need (invariants 4 and 5 of DESIGN.md)."""
from __future__ import annotations

import json
import multiprocessing
from datetime import datetime, timedelta, timezone

import pytest

from pipelines.cli import main as cli_main
from pipelines.config import load_settings
from pipelines.config import IndexSettings
from pipelines.index import build_index
from pipelines.layout import hold_key, latest_key, snapshot_prefix, validation_report_key
from pipelines.publish import (LatestMoved, PublishError, apply_retention, list_snapshots, publish_snapshot,
                               read_latest, rollback)
from pipelines.snapshot import PointerInvalid
from pipelines.storage import LocalStorage, StorageError, WriteConflict, open_storage
from synthetic_catalog import MODEL, write_catalog

CFG = IndexSettings(max_vectors_per_shard=100, flat_max_vectors=1000, recall_queries=10)


@pytest.fixture
def warehouse(tmp_path):
    uri = (tmp_path / "warehouse").as_uri()
    storage = open_storage(uri)
    write_catalog(storage, "r1", {"food": 60, "tools": 40})
    return load_settings(warehouse=uri), storage


def build(settings, **kwargs):
    return build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local", **kwargs)


def read_build(storage, snapshot_id):
    return json.loads(storage.read_text(snapshot_prefix("catalog", snapshot_id) + "_build.json"))


# -- compare-and-swap ----------------------------------------------------------------------------

def test_two_builds_from_one_base_the_second_publish_loses_and_says_so(warehouse, capsys):
    settings, storage = warehouse
    first = build(settings)
    assert read_build(storage, first.snapshot_id)["base_snapshot"] is None
    publish_snapshot(storage, "catalog", snapshot_id=first.snapshot_id)
    nightly, backfill = build(settings), build(settings, categories=["food"])
    for built in (nightly, backfill):
        assert read_build(storage, built.snapshot_id)["base_snapshot"] == first.snapshot_id
    published = publish_snapshot(storage, "catalog", snapshot_id=backfill.snapshot_id)
    assert published.manifest["base_snapshot"] == published.manifest["previous_snapshot"] == first.snapshot_id
    with pytest.raises(LatestMoved, match=f"started from {first.snapshot_id}, LATEST now names {backfill.snapshot_id}"):
        publish_snapshot(storage, "catalog", snapshot_id=nightly.snapshot_id)
    assert read_latest(storage, "catalog")["snapshot_id"] == backfill.snapshot_id
    assert not storage.exists(snapshot_prefix("catalog", nightly.snapshot_id) + "manifest.json")  # nothing stranded
    code = cli_main(["publish", "--warehouse", settings.warehouse, "--snapshot-id", nightly.snapshot_id])
    err = capsys.readouterr().err.replace("\n", " ")
    assert code == 1 and "moved" in err and "Rebuild" in err
    rebuilt = build(settings)   # a rebuild on the new live snapshot publishes
    assert publish_snapshot(storage, "catalog", snapshot_id=rebuilt.snapshot_id).previous_snapshot == backfill.snapshot_id


def _race(args):
    root, version, n = args
    storage = LocalStorage(root)
    try:
        storage.write_if("indexes/catalog/LATEST", f"writer {n}\n".encode(), version)
        return n
    except WriteConflict:
        return None


@pytest.mark.parametrize("exists", [False, True])
def test_local_compare_and_swap_has_exactly_one_winner_among_processes(tmp_path, exists):
    storage = LocalStorage(tmp_path)
    if exists:
        storage.write_bytes("indexes/catalog/LATEST", b"start\n")
    version = storage.read_versioned("indexes/catalog/LATEST")[1] if exists else None
    with multiprocessing.get_context("fork").Pool(8) as pool:
        winners = [n for n in pool.map(_race, [(str(tmp_path), version, n) for n in range(32)]) if n is not None]
    assert len(winners) == 1
    assert storage.read_bytes("indexes/catalog/LATEST") == f"writer {winners[0]}\n".encode()
    assert [p.name for p in (tmp_path / "indexes/catalog").iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.s3
def test_s3_conditional_writes_create_once_and_replace_only_the_version_read(s3_store):
    bucket, s3 = s3_store
    storage = open_storage(f"s3://{bucket}/wh", s3)
    storage.write_if("k", b"one", None)
    with pytest.raises(WriteConflict):
        storage.write_if("k", b"two", None)
    data, etag = storage.read_versioned("k")
    storage.write_if("k", b"three", etag)
    with pytest.raises(WriteConflict):
        storage.write_if("k", b"four", etag)           # the ETag read before "three" no longer matches
    assert storage.read_bytes("k") == b"three"
    assert storage.read_versioned("missing") is None
    with pytest.raises(WriteConflict):
        storage.write_if("missing", b"x", etag)
    storage.check_conditional_writes("probe")


def test_rollback_loses_to_a_publish_that_lands_during_its_verification(warehouse, tmp_path):
    settings, storage = warehouse
    ids = []
    for _ in range(2):
        built = build(settings)
        ids.append(publish_snapshot(storage, "catalog", snapshot_id=built.snapshot_id).snapshot_id)
    third = build(settings)

    class PublishDuringVerify(LocalStorage):
        """A real local warehouse; a publish by another process lands while rollback downloads files."""
        fired = False

        def download_file(self, key, local_path, expected_bytes=None):
            if not self.fired and ids[0] in key:
                PublishDuringVerify.fired = True
                publish_snapshot(LocalStorage(self.root), "catalog", snapshot_id=third.snapshot_id)
            return super().download_file(key, local_path, expected_bytes)

    with pytest.raises(LatestMoved, match=f"LATEST now names {third.snapshot_id}"):
        rollback(PublishDuringVerify(storage.root), "catalog", ids[0])
    assert read_latest(storage, "catalog")["snapshot_id"] == third.snapshot_id


def test_an_unreadable_latest_blocks_publish_and_rollback_repairs_it(warehouse):
    settings, storage = warehouse
    first = build(settings)
    publish_snapshot(storage, "catalog", snapshot_id=first.snapshot_id)
    second = build(settings)
    storage.write_bytes(latest_key("catalog"), b"")   # what a crash without fsync used to leave
    with pytest.raises(PointerInvalid, match="rollback --to"):
        publish_snapshot(storage, "catalog", snapshot_id=second.snapshot_id)
    rollback(storage, "catalog", first.snapshot_id)
    assert read_latest(storage, "catalog")["snapshot_id"] == first.snapshot_id
    assert publish_snapshot(storage, "catalog", snapshot_id=second.snapshot_id).previous_snapshot == first.snapshot_id


# -- idempotent publish -------------------------------------------------------------------------

def test_publish_is_idempotent_and_retention_failures_are_reported_not_fatal(warehouse):
    settings, storage = warehouse
    ids = [publish_snapshot(storage, "catalog", snapshot_id=build(settings).snapshot_id, keep_snapshots=1).snapshot_id
           for _ in range(2)]
    third = build(settings)

    class NoDeletes(LocalStorage):
        def delete_prefix(self, prefix):
            raise StorageError(f"SlowDown: deleting {prefix}")

    result = publish_snapshot(NoDeletes(storage.root), "catalog", snapshot_id=third.snapshot_id, keep_snapshots=1)
    assert result.retention_error and "SlowDown" in result.retention_error
    assert read_latest(storage, "catalog")["snapshot_id"] == third.snapshot_id
    again = publish_snapshot(storage, "catalog", run_id="r1", keep_snapshots=1)   # the task's retry
    assert again.already_live and again.snapshot_id == third.snapshot_id and again.retention_error is None
    assert [s.snapshot_id for s in list_snapshots(storage, "catalog")] == [third.snapshot_id]
    assert ids[-1] in again.deleted


def test_a_published_snapshot_superseded_before_its_latest_write_is_not_revived(warehouse):
    settings, storage = warehouse
    first = publish_snapshot(storage, "catalog", snapshot_id=build(settings).snapshot_id).snapshot_id
    stranded = build(settings)
    prefix = snapshot_prefix("catalog", stranded.snapshot_id)
    # its publish wrote the manifest and died; meanwhile a backfill published
    from pipelines.publish import make_manifest
    from pipelines.snapshot import manifest_bytes
    storage.write_bytes(prefix + "manifest.json", manifest_bytes(make_manifest(stranded.report, first, 0.9)))
    other = build(settings, categories=["tools"])
    publish_snapshot(storage, "catalog", snapshot_id=other.snapshot_id)
    with pytest.raises(LatestMoved, match="never went live"):
        publish_snapshot(storage, "catalog", snapshot_id=stranded.snapshot_id)
    assert read_latest(storage, "catalog")["snapshot_id"] == other.snapshot_id


def test_publish_without_an_id_skips_builds_that_failed_their_gates(warehouse):
    settings, storage = warehouse
    good = build(settings)
    gated = build(settings)
    storage.write_text(validation_report_key("r2", "index"), json.dumps({"outcome": "stopped"}))
    gated_build = read_build(storage, gated.snapshot_id)
    storage.write_text(snapshot_prefix("catalog", gated.snapshot_id) + "_build.json",
                       json.dumps({**gated_build, "source_run_id": "r2"}))
    published = publish_snapshot(storage, "catalog")
    assert published.snapshot_id == good.snapshot_id
    with pytest.raises(PublishError, match="index validation of run r2 stopped"):
        publish_snapshot(storage, "catalog", snapshot_id=gated.snapshot_id)


# -- retention ------------------------------------------------------------------------------------

def test_retention_keeps_young_builds_held_snapshots_unknown_manifests_and_foreign_folders(warehouse):
    settings, storage = warehouse
    in_progress = build(settings)   # a backfill still uploading: older than what gets published next
    ids = [publish_snapshot(storage, "catalog", snapshot_id=build(settings).snapshot_id, keep_snapshots=10).snapshot_id
           for _ in range(4)]
    storage.write_text("indexes/catalog/not-a-snapshot/notes.txt", "hand-made")
    # ids[0]: manifest unreadable (a throttled read); ids[1]: held by a rollback in progress
    unreadable = snapshot_prefix("catalog", ids[0]) + "manifest.json"

    class Throttled(LocalStorage):
        def read_bytes(self, key, max_bytes=None):
            if key == unreadable:
                raise StorageError("S3 read failed: SlowDown")
            return super().read_bytes(key, max_bytes)

    storage.write_text(hold_key("catalog", ids[1], "t1"),
                       json.dumps({"since": datetime.now(timezone.utc).isoformat()}))
    assert apply_retention(Throttled(storage.root), "catalog", keep_snapshots=1) == [ids[2]]  # only the plain case
    states = {s.snapshot_id: s.state for s in list_snapshots(Throttled(storage.root), "catalog")}
    assert states.pop(ids[0]).startswith("unknown:")
    assert states == {in_progress.snapshot_id: "built", ids[1]: "published", ids[3]: "live"}
    # a day later the build is abandoned, the hold has expired and the manifest reads again
    later = datetime.now(timezone.utc) + timedelta(hours=25)
    deleted = apply_retention(storage, "catalog", keep_snapshots=1, now=later)
    assert sorted(deleted) == sorted([in_progress.snapshot_id, *ids[:2]])
    assert [s.snapshot_id for s in list_snapshots(storage, "catalog")] == [ids[3]]
    assert storage.exists("indexes/catalog/not-a-snapshot/notes.txt")


def test_a_rollback_target_is_never_retired_under_it(warehouse):
    """Retention marks a snapshot before deleting it and then looks for holds; rollback holds first, then
    looks for the mark: a rollback that would race a retention backs off instead of serving a ghost."""
    settings, storage = warehouse
    ids = [publish_snapshot(storage, "catalog", snapshot_id=build(settings).snapshot_id, keep_snapshots=10).snapshot_id
           for _ in range(3)]
    storage.write_text(snapshot_prefix("catalog", ids[0]) + "_retiring.json", "{}")
    with pytest.raises(PublishError, match="being retired"):
        rollback(storage, "catalog", ids[0])
    assert read_latest(storage, "catalog")["snapshot_id"] == ids[2]
    assert storage.list("indexes/catalog/_holds/") == []


@pytest.mark.s3
def test_the_snapshot_protocol_on_s3_compatible_stores(s3_store, tmp_path):
    """moto and a real SeaweedFS: publish, a lost race, rollback by compare-and-swap, pull."""
    from pipelines.client import pull

    bucket, s3 = s3_store
    uri = f"s3://{bucket}/wh"
    storage = open_storage(uri, s3)
    write_catalog(storage, "r1", {"food": 40, "tools": 30})
    settings = load_settings(warehouse=uri, s3=s3.model_dump())
    first = publish_snapshot(storage, "catalog", snapshot_id=build(settings).snapshot_id).snapshot_id
    nightly, backfill = build(settings), build(settings, categories=["tools"])
    publish_snapshot(storage, "catalog", snapshot_id=backfill.snapshot_id)
    with pytest.raises(LatestMoved):
        publish_snapshot(storage, "catalog", snapshot_id=nightly.snapshot_id)
    rollback(storage, "catalog", first)
    pulled = pull(uri, tmp_path / "serving", s3=s3)
    assert pulled.snapshot_id == first == read_latest(storage, "catalog")["snapshot_id"]
    assert storage.list("indexes/catalog/_holds/") == []
