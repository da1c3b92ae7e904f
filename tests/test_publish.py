"""Snapshot protocol against S3 spoken over HTTP (moto): publish, interruption, retention, rollback."""
from __future__ import annotations

import hashlib
import json

import pytest

from pipelines.config import IndexSettings, load_settings
from pipelines.index import build_index
from pipelines.layout import snapshot_prefix
from pipelines.publish import (ManifestInvalid, PublishError, SnapshotVerificationError, apply_retention,
                               list_snapshots, publish_snapshot, read_latest, read_manifest, rollback,
                               validate_manifest)
from pipelines.storage import S3Storage, open_storage
from synthetic_catalog import MODEL, write_catalog

CATEGORIES = {"food": 300, "tools": 200, "toys": 100}
CFG = IndexSettings(max_vectors_per_shard=300, flat_max_vectors=600, recall_queries=30)


@pytest.fixture
def s3_warehouse(s3_bucket):
    bucket, s3 = s3_bucket
    uri = f"s3://{bucket}/warehouse"
    settings = load_settings(warehouse=uri, s3=s3.model_dump())
    storage = open_storage(uri, s3)
    write_catalog(storage, "r1", CATEGORIES)
    return settings, storage


@pytest.fixture
def local_warehouse(tmp_path):
    """Same protocol on a local directory: for the tests that need many publishes."""
    uri = (tmp_path / "warehouse").as_uri()
    storage = open_storage(uri)
    write_catalog(storage, "r1", CATEGORIES)
    return load_settings(warehouse=uri), storage


def build_and_publish(settings, storage, keep: int = 5):
    built = build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local")
    return built, publish_snapshot(storage, "catalog", snapshot_id=built.snapshot_id, keep_snapshots=keep)


class Interrupted(RuntimeError):
    pass


def fail_after(monkeypatch, uploads: int, methods=("upload_file", "write_bytes", "write_if")):
    """Make the S3 backend die after `uploads` successful object writes (a killed process)."""
    calls = {"n": 0}
    for name in methods:
        original = getattr(S3Storage, name)

        def wrapper(self, *args, _original=original, **kwargs):
            if calls["n"] >= uploads:
                raise Interrupted(f"injected crash after {uploads} uploads")
            calls["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(S3Storage, name, wrapper)
    return calls


def test_publish_over_s3_writes_a_verified_manifest_then_latest(s3_warehouse):
    settings, storage = s3_warehouse
    built, published = build_and_publish(settings, storage)
    pointer = read_latest(storage, "catalog")
    prefix = snapshot_prefix("catalog", built.snapshot_id)
    manifest_data = storage.read_bytes(prefix + "manifest.json")
    assert pointer["snapshot_id"] == built.snapshot_id
    assert pointer["manifest_sha256"] == hashlib.sha256(manifest_data).hexdigest()
    manifest = read_manifest(storage, "catalog", built.snapshot_id)
    assert manifest["source_run_id"] == "r1" and manifest["previous_snapshot"] is None
    assert manifest["model"]["version"] == "test-model-v1" and manifest["dimension"] == 32
    assert manifest["metric"] == "inner_product"
    assert manifest["totals"]["products"] == sum(CATEGORIES.values())
    for record in manifest["files"]:
        data = storage.read_bytes(record["key"])
        assert (len(data), hashlib.sha256(data).hexdigest()) == (record["bytes"], record["sha256"])
    for shard in manifest["shards"]:
        assert shard["categories"] and shard["index_type"] and 0.9 <= shard["recall_at_10"] <= 1
    _, second = build_and_publish(settings, storage)
    assert second.manifest["previous_snapshot"] == built.snapshot_id


@pytest.mark.parametrize("uploads", [0, 3])
def test_build_killed_mid_upload_leaves_latest_on_the_previous_snapshot(s3_warehouse, monkeypatch, uploads):
    settings, storage = s3_warehouse
    good, _ = build_and_publish(settings, storage)
    fail_after(monkeypatch, uploads)
    with pytest.raises(Interrupted):
        build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local")
    monkeypatch.undo()
    assert read_latest(storage, "catalog")["snapshot_id"] == good.snapshot_id
    states = {s.snapshot_id: s.state for s in list_snapshots(storage, "catalog")}
    assert states[good.snapshot_id] == "live"
    assert all(state == "incomplete" for sid, state in states.items() if sid != good.snapshot_id)
    with pytest.raises(PublishError, match="no unpublished build"):
        publish_snapshot(storage, "catalog")


def test_publish_stopped_before_latest_leaves_latest_unchanged_and_a_rerun_completes_it(s3_warehouse, monkeypatch):
    settings, storage = s3_warehouse
    good, _ = build_and_publish(settings, storage)
    second = build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local")
    fail_after(monkeypatch, 1, methods=("write_if",))  # manifest.json goes through, LATEST does not
    with pytest.raises(Interrupted):
        publish_snapshot(storage, "catalog", snapshot_id=second.snapshot_id)
    monkeypatch.undo()
    assert read_latest(storage, "catalog")["snapshot_id"] == good.snapshot_id
    assert storage.exists(snapshot_prefix("catalog", second.snapshot_id) + "manifest.json")
    # the retry (what Airflow does with the publish task) completes it, by run id as the DAG asks
    done = publish_snapshot(storage, "catalog", run_id="r1")
    assert (done.snapshot_id, done.already_live) == (second.snapshot_id, False)
    assert read_latest(storage, "catalog")["snapshot_id"] == second.snapshot_id
    again = publish_snapshot(storage, "catalog", run_id="r1")
    assert (again.snapshot_id, again.already_live) == (second.snapshot_id, True)
    assert again.manifest["previous_snapshot"] == again.manifest["base_snapshot"] == good.snapshot_id


def test_publish_refuses_a_build_whose_files_changed_after_upload(s3_warehouse):
    settings, storage = s3_warehouse
    built = build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local")
    key = snapshot_prefix("catalog", built.snapshot_id) + built.shards[0]["files"]["index"]["path"]
    storage.write_bytes(key, storage.read_bytes(key)[:-10])
    with pytest.raises(SnapshotVerificationError, match="fail verification"):
        publish_snapshot(storage, "catalog")
    assert read_latest(storage, "catalog") is None


def test_retention_keeps_the_newest_and_whatever_latest_points_to(local_warehouse):
    settings, storage = local_warehouse
    ids = [build_and_publish(settings, storage, keep=2)[0].snapshot_id for _ in range(3)]
    assert [s.snapshot_id for s in list_snapshots(storage, "catalog")] == ids[1:]
    rollback(storage, "catalog", ids[1])
    assert read_latest(storage, "catalog")["action"] == "rollback"
    fourth, _ = build_and_publish(settings, storage, keep=2)  # LATEST moves on to the fourth
    assert [s.snapshot_id for s in list_snapshots(storage, "catalog")] == [ids[2], fourth.snapshot_id]
    rollback(storage, "catalog", ids[2])
    assert apply_retention(storage, "catalog", 1) == []     # newest kept, and the live one
    states = {s.snapshot_id: s.state for s in list_snapshots(storage, "catalog")}
    assert states == {ids[2]: "live", fourth.snapshot_id: "published"}


def test_rollback_refuses_unknown_and_damaged_snapshots(s3_warehouse):
    settings, storage = s3_warehouse
    first, _ = build_and_publish(settings, storage)
    second, _ = build_and_publish(settings, storage)
    with pytest.raises(PublishError, match="is not a published snapshot"):
        rollback(storage, "catalog", "20200101T000000.000Z-0000")
    with pytest.raises(PublishError, match="already points to"):
        rollback(storage, "catalog", second.snapshot_id)
    idmap = snapshot_prefix("catalog", first.snapshot_id) + first.shards[0]["files"]["idmap"]["path"]
    storage.write_bytes(idmap, b"not parquet")
    with pytest.raises(SnapshotVerificationError):
        rollback(storage, "catalog", first.snapshot_id)
    assert read_latest(storage, "catalog")["snapshot_id"] == second.snapshot_id


def test_manifests_are_validated_against_the_versioned_schema(local_warehouse):
    settings, storage = local_warehouse
    built, published = build_and_publish(settings, storage)
    manifest = json.loads(json.dumps(published.manifest))
    del manifest["shards"][0]["files"]["index"]["sha256"]
    with pytest.raises(ManifestInvalid, match="shards/0/files/index.*'sha256' is a required property"):
        validate_manifest(manifest)
    with pytest.raises(ManifestInvalid, match="upgrade catalog-index"):
        validate_manifest({**published.manifest, "manifest_version": 2})
    key = snapshot_prefix("catalog", built.snapshot_id) + "manifest.json"
    storage.write_text(key, json.dumps({**published.manifest, "metric": "l2"}))
    with pytest.raises(ManifestInvalid, match="metric"):
        read_manifest(storage, "catalog", built.snapshot_id)
