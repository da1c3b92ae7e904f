"""Publish stage: make a built snapshot the one serving teams get, atomically; list, roll back, retire.

The snapshot protocol (DESIGN.md, "Snapshot protocol"), in the order it happens:

1. `build-index` uploads shard files and id maps into `indexes/<name>/<snapshot_id>/` with a
   `_build.json` report. Nothing reads that directory yet.
2. `publish` re-reads every file from the warehouse and checks its size and sha256 against the
   build report, writes `manifest.json` (validated against `schemas/snapshot_manifest.schema.json`)
   and reads it back.
3. Only then does it write `indexes/<name>/LATEST` (one small object, replaced atomically): the
   snapshot id plus the manifest's sha256, so a reader can check the manifest too.
4. Retention deletes published snapshots beyond the newest `keep_snapshots`, never the one
   `LATEST` points to, and abandoned builds that a newer snapshot superseded.

A publish stopped at any point leaves `LATEST` on the previous complete snapshot. `rollback`
re-verifies an older snapshot's files before pointing `LATEST` at it.

This module must never change a file of a published snapshot (a snapshot is immutable once its
manifest exists), and never write `LATEST` before the snapshot it names has been verified.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from pipelines.storage import Storage
from pipelines.layout import index_prefix, latest_key, snapshot_prefix
from pipelines.snapshot import (BUILD_FILE, MANIFEST_FILE, MANIFEST_VERSION, ManifestInvalid, PointerInvalid,  # noqa: F401
                                PublishError, SnapshotVerificationError, check_snapshot_id, manifest_bytes,
                                parse_manifest, read_build, read_latest, read_manifest, sha256_of_file,
                                snapshot_files, validate_manifest, verify_snapshot_files)



# ------------------------------------------------------------------------------------------
# reading the warehouse
# ------------------------------------------------------------------------------------------

def find_build(storage: Storage, index_name: str, snapshot_id: str | None = None,
               run_id: str | None = None) -> dict:
    """The build to publish: the one named, else the newest unpublished build (of `run_id`, if given)."""
    if snapshot_id:
        return read_build(storage, index_name, snapshot_id)
    for candidate in reversed(storage.list_dirs(index_prefix(index_name))):
        prefix = snapshot_prefix(index_name, candidate)
        if storage.exists(prefix + MANIFEST_FILE) or not storage.exists(prefix + BUILD_FILE):
            continue
        build = json.loads(storage.read_text(prefix + BUILD_FILE))
        if run_id is None or build.get("source_run_id") == run_id:
            return build
    raise PublishError(f"no unpublished build of index {index_name!r}"
                       + (f" for run {run_id}" if run_id else "")
                       + f" under {storage.uri_for(index_prefix(index_name))}: run build-index first")


# ------------------------------------------------------------------------------------------
# publish
# ------------------------------------------------------------------------------------------

@dataclass
class PublishResult:
    snapshot_id: str
    previous_snapshot: str | None
    manifest: dict = field(repr=False)
    deleted: list[str] = field(default_factory=list)


def make_manifest(build: dict, previous_snapshot: str | None, min_recall: float) -> dict:
    shards = []
    for shard in build["shards"]:
        shards.append({key: shard[key] for key in (
            "shard_id", "categories", "index_type", "faiss_factory", "search_params", "vectors", "products",
            "idmap_rows", "recall_at_10", "recall_queries", "estimated_memory_bytes", "files")}
            | {"reused_from": shard.get("reused_from"), "build_seconds": shard.get("build_seconds"),
               "device": shard.get("device"), "members_sha256": shard.get("members_sha256")})
    recalls = [s["recall_at_10"] for s in shards]
    files = snapshot_files(build)
    prefix = snapshot_prefix(build["index_name"], build["snapshot_id"])
    return {
        "manifest_version": MANIFEST_VERSION,
        "index_name": build["index_name"],
        "snapshot_id": build["snapshot_id"],
        "created_at": build["created_at"],
        "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_run_id": build["source_run_id"],
        "previous_snapshot": previous_snapshot,
        "model": build["model"],
        "dimension": build["dimension"],
        "metric": build["metric"],
        "vectors_normalized": True,
        "totals": {"shards": len(shards), "vectors": sum(s["vectors"] for s in shards),
                   "products": sum(s["products"] for s in shards),
                   "bytes": sum(f["bytes"] for f in files),
                   "missing_embeddings": build.get("missing_embeddings", 0)},
        "recall_at_10": {"min": min(recalls), "mean": round(sum(recalls) / len(recalls), 4),
                         "threshold": min_recall, "k": 10},
        "shards": shards,
        "files": [{**f, "key": prefix + f["path"]} for f in files],
        "model_files": build.get("model_files", []),
        "backfill": build.get("backfill"),
    }


def publish_snapshot(storage: Storage, index_name: str, *, snapshot_id: str | None = None, run_id: str | None = None,
                     keep_snapshots: int = 5, min_recall: float | None = None) -> PublishResult:
    """Verify a passed build, write its manifest, then LATEST; apply retention. See the module doc."""
    build = find_build(storage, index_name, snapshot_id, run_id)
    snapshot_id = build["snapshot_id"]
    prefix = snapshot_prefix(index_name, snapshot_id)
    if build.get("status") != "passed":
        raise PublishError(f"build {snapshot_id} did not pass its recall check (status {build.get('status')!r}); "
                           "fix the index settings and run build-index again")
    if storage.exists(prefix + MANIFEST_FILE):
        raise PublishError(f"snapshot {snapshot_id} is already published; use `catalog-index rollback --to "
                           f"{snapshot_id}` to serve it again")
    verify_snapshot_files(storage, prefix, snapshot_files(build))
    pointer = read_latest(storage, index_name)
    previous = pointer["snapshot_id"] if pointer else None
    threshold = min_recall if min_recall is not None else build.get("settings", {}).get("min_recall", 0.0)
    manifest = validate_manifest(make_manifest(build, previous, threshold), f"manifest of {snapshot_id}")
    data = manifest_bytes(manifest)
    storage.write_bytes(prefix + MANIFEST_FILE, data)
    if storage.read_bytes(prefix + MANIFEST_FILE) != data:
        raise SnapshotVerificationError(f"{storage.uri_for(prefix + MANIFEST_FILE)} reads back different from what "
                                        "was written; LATEST left unchanged. Check the object store", [MANIFEST_FILE])
    write_latest(storage, index_name, snapshot_id, hashlib.sha256(data).hexdigest(), action="publish")
    deleted = apply_retention(storage, index_name, keep_snapshots)
    return PublishResult(snapshot_id, previous, manifest, deleted)


def write_latest(storage: Storage, index_name: str, snapshot_id: str, manifest_sha256: str, action: str) -> None:
    pointer = {"snapshot_id": snapshot_id, "manifest_sha256": manifest_sha256, "action": action,
               "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    storage.write_text(latest_key(index_name), json.dumps(pointer, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------
# listing, retention, rollback
# ------------------------------------------------------------------------------------------

@dataclass
class SnapshotInfo:
    snapshot_id: str
    state: str                 # live | published | built | failed_recall_check | incomplete
    created_at: str | None = None
    source_run_id: str | None = None
    vectors: int | None = None
    products: int | None = None
    shards: int | None = None
    min_recall: float | None = None
    bytes: int | None = None
    backfill: dict | None = None


def list_snapshots(storage: Storage, index_name: str) -> list[SnapshotInfo]:
    """Every snapshot directory of the index, oldest first, with its state."""
    pointer = read_latest(storage, index_name)
    live = pointer["snapshot_id"] if pointer else None
    infos = []
    for snapshot_id in storage.list_dirs(index_prefix(index_name)):
        prefix = snapshot_prefix(index_name, snapshot_id)
        if storage.exists(prefix + MANIFEST_FILE):
            try:
                manifest = read_manifest(storage, index_name, snapshot_id)
            except (ManifestInvalid, ValueError) as exc:
                infos.append(SnapshotInfo(snapshot_id, f"invalid manifest: {exc}"))
                continue
            infos.append(SnapshotInfo(
                snapshot_id, "live" if snapshot_id == live else "published", manifest["created_at"],
                manifest["source_run_id"], manifest["totals"]["vectors"], manifest["totals"]["products"],
                manifest["totals"]["shards"], manifest["recall_at_10"]["min"], manifest["totals"]["bytes"],
                manifest.get("backfill")))
        elif storage.exists(prefix + BUILD_FILE):
            build = json.loads(storage.read_text(prefix + BUILD_FILE))
            recalls = [s["recall_at_10"] for s in build["shards"]]
            infos.append(SnapshotInfo(
                snapshot_id, "built" if build["status"] == "passed" else build["status"], build["created_at"],
                build["source_run_id"], sum(s["vectors"] for s in build["shards"]),
                sum(s["products"] for s in build["shards"]), len(build["shards"]), min(recalls, default=None),
                backfill=build.get("backfill")))
        else:
            infos.append(SnapshotInfo(snapshot_id, "incomplete"))
    return infos


def apply_retention(storage: Storage, index_name: str, keep_snapshots: int) -> list[str]:
    """Delete published snapshots beyond the newest `keep_snapshots` (never LATEST's) and superseded builds."""
    pointer = read_latest(storage, index_name)
    live = pointer["snapshot_id"] if pointer else None
    snapshots = list_snapshots(storage, index_name)
    published = [s.snapshot_id for s in snapshots if s.state in ("live", "published")]
    keep = set(published[-keep_snapshots:]) | ({live} if live else set())
    newest_published = published[-1] if published else None
    doomed = [sid for sid in published if sid not in keep]
    # A build that never got published and is older than a published snapshot was superseded.
    doomed += [s.snapshot_id for s in snapshots if s.state not in ("live", "published")
               and newest_published and s.snapshot_id < newest_published and s.snapshot_id != live]
    for snapshot_id in doomed:
        prefix = snapshot_prefix(index_name, snapshot_id)
        # The manifest goes first: a half-deleted snapshot then reads as incomplete, never as published.
        storage.delete(prefix + MANIFEST_FILE)
        storage.delete_prefix(prefix)
    return doomed


def rollback(storage: Storage, index_name: str, to_snapshot_id: str) -> dict:
    """Point LATEST at an earlier published snapshot after re-verifying every one of its files."""
    check_snapshot_id(to_snapshot_id, "--to", PublishError)
    pointer = read_latest(storage, index_name)
    if pointer and pointer["snapshot_id"] == to_snapshot_id:
        raise PublishError(f"LATEST already points to {to_snapshot_id}")
    prefix = snapshot_prefix(index_name, to_snapshot_id)
    if not storage.exists(prefix + MANIFEST_FILE):
        published = [s.snapshot_id for s in list_snapshots(storage, index_name) if s.state in ("live", "published")]
        raise PublishError(f"{to_snapshot_id} is not a published snapshot of index {index_name!r} "
                           f"(published: {', '.join(published) or 'none'})")
    data = storage.read_bytes(prefix + MANIFEST_FILE)
    manifest = parse_manifest(data, storage.uri_for(prefix + MANIFEST_FILE), index_name, to_snapshot_id)
    verify_snapshot_files(storage, prefix, manifest["files"])
    write_latest(storage, index_name, to_snapshot_id, hashlib.sha256(data).hexdigest(), action="rollback")
    return manifest
