"""Publish stage: make a built snapshot the one serving teams get, atomically; list, roll back, retire.

The snapshot protocol (DESIGN.md, "Snapshot protocol"), in the order it happens:

1. `build-index` uploads shard files and id maps into `indexes/<name>/<snapshot_id>/` with a
   `_build.json` report that records `base_snapshot`: the snapshot `LATEST` named when the build
   started (its shards may be copies of that snapshot's). Nothing reads that directory yet.
2. `publish` holds the snapshot (`indexes/<name>/_holds/`), re-reads every file from the warehouse
   and checks its size and sha256 against the build report, checks that `LATEST` still names the
   base, writes `manifest.json` (validated against `schemas/snapshot_manifest.schema.json`) and
   reads it back.
3. Only then does it move `indexes/<name>/LATEST`, by compare-and-swap from the base: an S3
   conditional write (`If-Match` on the ETag read, `If-None-Match: *` for the first publish) or,
   on a local warehouse, a write under an exclusive lock, fsynced. If `LATEST` moved meanwhile (a
   backfill or another night published), nothing is overwritten: `LatestMoved`, exit 1, rebuild.
4. Retention deletes published snapshots beyond the newest `keep_snapshots`, never the one
   `LATEST` points to, never a held one, never one whose manifest cannot be read (unknown: kept),
   and unpublished directories only once they are older than `retention_grace_hours` and older
   than a published snapshot. A retention failure is reported, not fatal: the snapshot is live.

Publishing is idempotent: a retry after the manifest was written completes the `LATEST` write
(still by compare-and-swap from the recorded base), and succeeds at once when `LATEST` already
names the snapshot. `rollback` holds and re-verifies an older snapshot, then moves `LATEST` by
compare-and-swap from what it read before verifying.

This module must never change a file of a published snapshot (a snapshot is immutable once its
manifest exists), and never write `LATEST` except by compare-and-swap, after the snapshot it names
has been verified.

The module is longer than 500 lines because publish, rollback and retention share the
compare-and-swap on LATEST and the holds that keep each other's snapshots alive; apart, each
would need the others' internals.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterator

from pipelines.errors import StageRefused
from pipelines.layout import (cas_probe_key, hold_key, holds_prefix, index_prefix, latest_key, retiring_key,
                              snapshot_prefix, validation_report_key)
from pipelines.snapshot import (BUILD_FILE, BUILD_MAX_BYTES, LATEST_MAX_BYTES, MANIFEST_FILE,  # noqa: F401
                                MANIFEST_MAX_BYTES, MANIFEST_VERSION, ManifestInvalid, PointerInvalid, PublishError,
                                SnapshotVerificationError, check_index_name, check_snapshot_id, is_snapshot_id,
                                latest_too_large, load_manifest, manifest_bytes, parse_latest, parse_manifest, read_build, read_latest,
                                read_manifest, read_manifest_bytes, sha256_of_file, snapshot_files, validate_manifest,
                                verify_snapshot_files)
from pipelines.storage import ObjectTooLarge, S3Storage, Storage, StorageError, WriteConflict

log = logging.getLogger(__name__)
UNKNOWN_BASE = object()  # a build from before base_snapshot was recorded


class LatestMoved(StageRefused):
    """LATEST no longer names the snapshot a publish or rollback started from: someone else moved it
    first. Nothing was overwritten (exit 1); the message says what to rebuild."""


# ------------------------------------------------------------------------------------------
# reading the warehouse
# ------------------------------------------------------------------------------------------

def _snapshot_dirs(storage: Storage, index_name: str) -> list[str]:
    """Snapshot directories of an index, oldest first. Anything else there (`_holds/`, a folder someone
    made by hand) is not a snapshot: never listed, published or deleted."""
    return [name for name in storage.list_dirs(index_prefix(index_name)) if is_snapshot_id(name)]


def _read_json(storage: Storage, key: str, max_bytes: int | None = None) -> dict:
    return json.loads(storage.read_text(key, max_bytes))


def _index_gate_stopped(storage: Storage, run_id: str) -> bool:
    """True when the run's index validation (validate --stage index) stopped the run."""
    key = validation_report_key(run_id, "index")
    if not storage.exists(key):
        return False
    try:
        return _read_json(storage, key).get("outcome") == "stopped"
    except (ValueError, StorageError):
        return True  # an unreadable verdict is not a pass


def find_build(storage: Storage, index_name: str, snapshot_id: str | None = None,
               run_id: str | None = None) -> dict:
    """The build to publish: the one named; else the newest build of `run_id` (published or not: a retry
    completes it); else the newest unpublished build that passed its recall check and index gate."""
    if snapshot_id:
        return read_build(storage, index_name, snapshot_id)
    skipped = []
    for candidate in reversed(_snapshot_dirs(storage, index_name)):
        prefix = snapshot_prefix(index_name, candidate)
        if not storage.exists(prefix + BUILD_FILE):
            continue
        if run_id is None and storage.exists(prefix + MANIFEST_FILE):
            continue
        build = _read_json(storage, prefix + BUILD_FILE, BUILD_MAX_BYTES)
        if run_id is not None:
            if build.get("source_run_id") == run_id:
                return build
            continue
        if build.get("status") != "passed" or _index_gate_stopped(storage, build.get("source_run_id", "")):
            skipped.append(f"{candidate} ({build.get('status') if build.get('status') != 'passed' else 'index gate stopped'})")
            continue
        return build
    raise PublishError(f"no unpublished build of index {index_name!r}"
                       + (f" for run {run_id}" if run_id else "")
                       + f" under {storage.uri_for(index_prefix(index_name))}"
                       + (f" that passed its checks (skipped: {', '.join(skipped)})" if skipped else "")
                       + ": run build-index first")


def build_base(build: dict):
    """The snapshot LATEST named when the build started (None: none was live); UNKNOWN_BASE for a build
    from before that was recorded (then a backfill's base, else whatever LATEST names at publish)."""
    if "base_snapshot" in build:
        return build["base_snapshot"]
    if build.get("backfill"):
        return build["backfill"]["base_snapshot"]
    return UNKNOWN_BASE


# ------------------------------------------------------------------------------------------
# LATEST: compare-and-swap
# ------------------------------------------------------------------------------------------

def read_latest_versioned(storage: Storage, index_name: str, strict: bool = True) -> tuple[dict | None, str | None]:
    """(pointer, version tag) of LATEST; (None, None) before the first publish. With strict=False an
    unreadable pointer (empty after a crash, garbage) reads as {"snapshot_id": None, "invalid": ...}
    so that a rollback can still replace it by compare-and-swap."""
    check_index_name(index_name)
    key = latest_key(index_name)
    try:
        got = storage.read_versioned(key, LATEST_MAX_BYTES)
    except ObjectTooLarge as exc:
        if strict:
            raise latest_too_large(exc) from exc
        return {"snapshot_id": None, "invalid": str(latest_too_large(exc))}, exc.version
    if got is None:
        return None, None
    data, version = got
    try:
        return parse_latest(data.decode("utf-8", errors="replace"), storage.uri_for(key)), version
    except PointerInvalid as exc:
        if strict:
            raise
        return {"snapshot_id": None, "invalid": str(exc)}, version


def _pointer_bytes(snapshot_id: str, manifest_sha256: str, action: str, previous: str | None) -> bytes:
    pointer = {"snapshot_id": snapshot_id, "manifest_sha256": manifest_sha256, "action": action,
               "previous_snapshot": previous, "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return (json.dumps(pointer, sort_keys=True) + "\n").encode()


def _moved_message(index_name: str, expected, current, action: str) -> str:
    return (f"LATEST of index {index_name!r} moved: this {action} started from "
            f"{expected or 'no live snapshot'}, LATEST now names {current or 'nothing'} (another publish, backfill or "
            "rollback got there first). Nothing was overwritten. "
            + ("Rebuild on the new live snapshot (rerun build-index, then publish) so that its changes are kept"
               if action == "publish" else "Check `catalog-index snapshots` and roll back again if still wanted"))


def swap_latest(storage: Storage, index_name: str, expected: str | None, snapshot_id: str, manifest_sha256: str,
                action: str) -> None:
    """Move LATEST from `expected` (None: absent) to `snapshot_id`, atomically, or raise LatestMoved.

    A conditional write that reaches the store but whose answer is lost is retried by the S3 client and
    then refused (the tag changed: we changed it): if LATEST now holds exactly our pointer, that is success.
    """
    if isinstance(storage, S3Storage):
        storage.check_conditional_writes(cas_probe_key(index_name, secrets.token_hex(6)))
    pointer, version = read_latest_versioned(storage, index_name, strict=action != "rollback")
    current = pointer["snapshot_id"] if pointer else None
    if pointer is not None and pointer.get("invalid") and action == "rollback":
        current = expected  # an unreadable LATEST (a crash mid-write on a store without fsync) may be replaced
    if current != expected:
        raise LatestMoved(_moved_message(index_name, expected, current, action))
    data = _pointer_bytes(snapshot_id, manifest_sha256, action, expected)
    try:
        storage.write_if(latest_key(index_name), data, version)
    except WriteConflict:
        try:
            now = storage.read_versioned(latest_key(index_name), LATEST_MAX_BYTES)
            if now is not None and now[0] == data:
                return
            moved_to = parse_latest(now[0].decode("utf-8", "replace"), "LATEST")["snapshot_id"] if now else None
        except (PointerInvalid, ObjectTooLarge):
            moved_to = "an unreadable pointer"
        raise LatestMoved(_moved_message(index_name, expected, moved_to, action)) from None


def write_latest(storage: Storage, index_name: str, snapshot_id: str, manifest_sha256: str, action: str) -> None:
    """Point LATEST at `snapshot_id` from whatever it names now, still by compare-and-swap (tests, repairs)."""
    pointer, _ = read_latest_versioned(storage, index_name, strict=False)
    swap_latest(storage, index_name, pointer["snapshot_id"] if pointer else None, snapshot_id, manifest_sha256,
                "rollback" if action == "rollback" else action)


# ------------------------------------------------------------------------------------------
# holds: what retention must not delete while a publish or rollback works on it
# ------------------------------------------------------------------------------------------

@contextmanager
def hold(storage: Storage, index_name: str, snapshot_id: str, holder: str) -> Iterator[None]:
    """Hold a snapshot directory for the duration of the block. A hold left by a killed process expires
    after index.retention_grace_hours."""
    key = hold_key(index_name, snapshot_id, secrets.token_hex(6))
    storage.write_text(key, json.dumps({"snapshot_id": snapshot_id, "holder": holder, "pid": os.getpid(),
                                        "host": socket.gethostname(), "since": _now().isoformat()}))
    try:
        if storage.exists(retiring_key(index_name, snapshot_id)):
            raise PublishError(f"snapshot {snapshot_id} is being retired by retention "
                               f"({storage.uri_for(retiring_key(index_name, snapshot_id))} exists); pick another "
                               "snapshot. If no publish is running, delete that file and retry")
        yield
    finally:
        try:
            storage.delete(key)
        except StorageError as exc:  # the hold expires by itself; the work is done
            log.warning("could not remove hold %s: %s", key, exc)


@contextmanager
def holding_live_snapshot(storage: Storage, index_name: str) -> Iterator[str | None]:
    """Hold the live snapshot while a build copies shards from it (a backfill, or a night's unchanged shards),
    so that a retention running meanwhile does not delete the files being copied. Yields its id (None: none).

    If LATEST moves between this hold and the build's own reading of it, the build may copy from a snapshot
    nobody holds; should that build then fail while LATEST has moved, the failure is LatestMoved (rebuild)."""
    for _ in range(5):
        pointer = read_latest(storage, index_name)
        if pointer is None:
            yield None
            return
        held = pointer["snapshot_id"]
        with hold(storage, index_name, held, "build"):
            again = read_latest(storage, index_name)
            if again is None or again["snapshot_id"] != held:
                continue  # moved before the hold landed: hold the new one
            try:
                yield held
            except Exception as exc:
                now = read_latest(storage, index_name)
                if now is not None and now["snapshot_id"] != held:
                    raise LatestMoved(f"the build failed ({type(exc).__name__}) after LATEST moved from {held} to "
                                      f"{now['snapshot_id']} (another publish or a rollback): the snapshot it copied "
                                      "shards from may have been retired meanwhile. Rebuild on the new live "
                                      "snapshot (rerun build-index)") from exc
                raise
            return
    raise LatestMoved(f"LATEST of index {index_name!r} kept moving while build-index tried to hold it: "
                      "wait for the running publishes and rollbacks to finish, then rerun build-index")


def _held(storage: Storage, index_name: str, grace: timedelta, now: datetime) -> set[str]:
    held = set()
    for key in storage.list(holds_prefix(index_name)):
        name = key.rsplit("/", 1)[-1]
        snapshot_id = name.split("--", 1)[0]
        if not is_snapshot_id(snapshot_id):
            continue
        try:
            since = datetime.fromisoformat(_read_json(storage, key)["since"])
        except (ValueError, KeyError, TypeError, StorageError):
            since = now  # unreadable: treat as fresh (keeping is the safe side)
        if now - since < grace:
            held.add(snapshot_id)
    return held


def _now() -> datetime:
    return datetime.now(timezone.utc)


def snapshot_time(snapshot_id: str) -> datetime:
    """When a build started, from its id (`20261123T031500.123Z-1a2b`)."""
    return datetime.strptime(snapshot_id[:19], "%Y%m%dT%H%M%S.%f").replace(tzinfo=timezone.utc)


# ------------------------------------------------------------------------------------------
# publish
# ------------------------------------------------------------------------------------------

@dataclass
class PublishResult:
    snapshot_id: str
    previous_snapshot: str | None
    manifest: dict = field(repr=False)
    deleted: list[str] = field(default_factory=list)
    already_live: bool = False            # a retry found LATEST already on this snapshot
    retention_error: str | None = None    # retention failed after LATEST moved: reported, not fatal


def make_manifest(build: dict, previous_snapshot: str | None, min_recall: float) -> dict:
    shards = []
    for shard in build["shards"]:
        shards.append({key: shard[key] for key in (
            "shard_id", "categories", "index_type", "faiss_factory", "search_params", "vectors", "products",
            "idmap_rows", "recall_at_10", "recall_queries", "estimated_memory_bytes", "files")}
            | {"reused_from": shard.get("reused_from"), "build_seconds": shard.get("build_seconds"),
               "device": shard.get("device"), "members_sha256": shard.get("members_sha256")}
            | ({"search_latency_ms": shard["search_latency_ms"]} if shard.get("search_latency_ms") else {}))
    recalls = [s["recall_at_10"] for s in shards]
    files = snapshot_files(build)
    prefix = snapshot_prefix(build["index_name"], build["snapshot_id"])
    return {
        "manifest_version": MANIFEST_VERSION,
        "index_name": build["index_name"],
        "snapshot_id": build["snapshot_id"],
        "created_at": build["created_at"],
        "published_at": _now().isoformat(timespec="seconds"),
        "source_run_id": build["source_run_id"],
        "previous_snapshot": previous_snapshot,
        "base_snapshot": previous_snapshot,  # LATEST moves only by compare-and-swap from the base: they are equal
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
                     keep_snapshots: int = 5, min_recall: float | None = None,
                     retention_grace_hours: float = 24.0) -> PublishResult:
    """Verify a passed build, write its manifest, then move LATEST from the build's base by
    compare-and-swap; apply retention. Idempotent: see the module doc."""
    build = find_build(storage, index_name, snapshot_id, run_id)
    snapshot_id = check_snapshot_id(build["snapshot_id"], "_build.json")
    prefix = snapshot_prefix(index_name, snapshot_id)
    if build.get("status") != "passed":
        raise PublishError(f"build {snapshot_id} did not pass its recall check (status {build.get('status')!r}); "
                           "fix the index settings and run build-index again")
    if _index_gate_stopped(storage, build.get("source_run_id", "")):
        raise PublishError(f"the index validation of run {build.get('source_run_id')} stopped the run "
                           f"(reports/{build.get('source_run_id')}/validation/index.json): snapshot {snapshot_id} "
                           "is not published. Fix the index and rebuild, or rerun `validate --stage index --force`")
    with hold(storage, index_name, snapshot_id, "publish"):
        if storage.exists(prefix + MANIFEST_FILE):
            manifest, _, already = _complete_publish(storage, index_name, snapshot_id)
        else:
            manifest, _, already = _first_publish(storage, index_name, build, min_recall), None, False
    result = PublishResult(snapshot_id, manifest["previous_snapshot"], manifest, already_live=already)
    try:
        result.deleted = apply_retention(storage, index_name, keep_snapshots, retention_grace_hours)
    except Exception as exc:  # noqa: BLE001 - the snapshot is live; a retention problem must not fail the publish
        result.retention_error = f"{type(exc).__name__}: {exc}"
        log.warning("snapshot %s is live, but retention failed (it runs again at the next publish): %s",
                    snapshot_id, result.retention_error)
    return result


def _first_publish(storage: Storage, index_name: str, build: dict, min_recall: float | None) -> dict:
    snapshot_id = build["snapshot_id"]
    prefix = snapshot_prefix(index_name, snapshot_id)
    verify_snapshot_files(storage, prefix, snapshot_files(build))
    pointer = read_latest(storage, index_name)
    live = pointer["snapshot_id"] if pointer else None
    base = build_base(build)
    if base is UNKNOWN_BASE:
        base = live
    if live != base:  # checked before the manifest is written: a lost race leaves no half-published snapshot
        raise LatestMoved(_moved_message(index_name, base, live, "publish"))
    threshold = min_recall if min_recall is not None else build.get("settings", {}).get("min_recall", 0.0)
    manifest = validate_manifest(make_manifest(build, base, threshold), f"manifest of {snapshot_id}")
    data = manifest_bytes(manifest)
    if len(data) > MANIFEST_MAX_BYTES:  # pull would refuse it: never publish a snapshot nobody can pull
        raise PublishError(f"the manifest of {snapshot_id} would be {len(data):,} bytes, past the "
                           f"{MANIFEST_MAX_BYTES:,} bytes pull reads (snapshot.MANIFEST_MAX_BYTES): build fewer, "
                           "larger shards (index.max_vectors_per_shard)")
    try:
        storage.write_if(prefix + MANIFEST_FILE, data, None)  # created once: a snapshot is immutable
    except WriteConflict:
        raise PublishError(f"snapshot {snapshot_id} was published by another process at the same time; "
                           "run publish again to complete it") from None
    if read_manifest_bytes(storage, index_name, snapshot_id) != data:
        raise SnapshotVerificationError(f"{storage.uri_for(prefix + MANIFEST_FILE)} reads back different from what "
                                        "was written; LATEST left unchanged. Check the object store", [MANIFEST_FILE])
    swap_latest(storage, index_name, base, snapshot_id, _sha256(data), "publish")
    return manifest


def _complete_publish(storage: Storage, index_name: str, snapshot_id: str) -> tuple[dict, bytes, bool]:
    """A publish that stopped after writing the manifest (or a rerun): make the snapshot live by
    compare-and-swap from the base its manifest records, or find that it already is."""
    prefix = snapshot_prefix(index_name, snapshot_id)
    manifest, data = load_manifest(storage, index_name, snapshot_id)
    pointer = read_latest(storage, index_name)
    if pointer and pointer["snapshot_id"] == snapshot_id:
        return manifest, data, True
    base = manifest.get("base_snapshot", manifest["previous_snapshot"])
    live = pointer["snapshot_id"] if pointer else None
    if live != base:
        raise LatestMoved(f"snapshot {snapshot_id} was published earlier but never went live, and LATEST has moved "
                          f"from its base {base or '(none)'} to {live or 'nothing'}: rebuild on the new live snapshot "
                          f"(build-index, then publish), or serve it anyway with `catalog-index rollback --to {snapshot_id}`")
    if pointer and pointer.get("action") == "rollback" and pointer.get("updated_at", "") > manifest["published_at"]:
        raise LatestMoved(f"LATEST was rolled back to {live} after snapshot {snapshot_id} was published: not "
                          f"undoing a rollback. Serve it anyway with `catalog-index rollback --to {snapshot_id}`")
    verify_snapshot_files(storage, prefix, manifest["files"])
    swap_latest(storage, index_name, base, snapshot_id, _sha256(data), "publish")
    return manifest, data, False


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------------------
# listing, retention, rollback
# ------------------------------------------------------------------------------------------

@dataclass
class SnapshotInfo:
    snapshot_id: str
    state: str                 # live | published | built | failed_recall_check | incomplete | retiring | unknown: ...
    created_at: str | None = None
    source_run_id: str | None = None
    vectors: int | None = None
    products: int | None = None
    shards: int | None = None
    min_recall: float | None = None
    bytes: int | None = None
    backfill: dict | None = None
    base_snapshot: str | None = None


def list_snapshots(storage: Storage, index_name: str) -> list[SnapshotInfo]:
    """Every snapshot directory of the index, oldest first, with its state. A manifest or build report
    that cannot be read (a throttled request, a damaged file) gives state `unknown: <why>`."""
    pointer = read_latest(storage, index_name)
    live = pointer["snapshot_id"] if pointer else None
    return [_snapshot_info(storage, index_name, snapshot_id, live) for snapshot_id in _snapshot_dirs(storage, index_name)]


def _snapshot_info(storage: Storage, index_name: str, snapshot_id: str, live: str | None) -> SnapshotInfo:
    prefix = snapshot_prefix(index_name, snapshot_id)
    try:
        if storage.exists(retiring_key(index_name, snapshot_id)):
            return SnapshotInfo(snapshot_id, "retiring")
        if storage.exists(prefix + MANIFEST_FILE):
            manifest = read_manifest(storage, index_name, snapshot_id)
            return SnapshotInfo(
                snapshot_id, "live" if snapshot_id == live else "published", manifest["created_at"],
                manifest["source_run_id"], manifest["totals"]["vectors"], manifest["totals"]["products"],
                manifest["totals"]["shards"], manifest["recall_at_10"]["min"], manifest["totals"]["bytes"],
                manifest.get("backfill"), manifest.get("base_snapshot", manifest["previous_snapshot"]))
        if storage.exists(prefix + BUILD_FILE):
            build = _read_json(storage, prefix + BUILD_FILE, BUILD_MAX_BYTES)
            recalls = [s["recall_at_10"] for s in build["shards"]]
            base = build_base(build)
            return SnapshotInfo(
                snapshot_id, "built" if build["status"] == "passed" else build["status"], build["created_at"],
                build["source_run_id"], sum(s["vectors"] for s in build["shards"]),
                sum(s["products"] for s in build["shards"]), len(build["shards"]), min(recalls, default=None),
                backfill=build.get("backfill"), base_snapshot=None if base is UNKNOWN_BASE else base)
        return SnapshotInfo(snapshot_id, "incomplete")
    except (StorageError, ValueError, KeyError, TypeError, PointerInvalid, SnapshotVerificationError) as exc:
        # ManifestInvalid and PublishError are ValueErrors: all mean "cannot tell", never "safe to delete"
        return SnapshotInfo(snapshot_id, f"unknown: {exc}")


def apply_retention(storage: Storage, index_name: str, keep_snapshots: int, grace_hours: float = 24.0,
                    now: datetime | None = None) -> list[str]:
    """Delete published snapshots beyond the newest `keep_snapshots` and superseded unpublished builds
    older than `grace_hours`; never LATEST's target, a held snapshot, or one in an unknown state."""
    now = now or _now()
    grace = timedelta(hours=grace_hours)
    pointer = read_latest(storage, index_name)  # an unreadable LATEST stops retention: nothing is deleted
    live = pointer["snapshot_id"] if pointer else None
    snapshots = list_snapshots(storage, index_name)
    published = [s.snapshot_id for s in snapshots if s.state in ("live", "published")]
    keep = set(published[-keep_snapshots:]) | ({live} if live else set())
    newest_published = published[-1] if published else None
    doomed = [sid for sid in published if sid not in keep]
    doomed += [s.snapshot_id for s in snapshots
               if s.state in ("built", "failed_recall_check", "incomplete")
               and newest_published and s.snapshot_id < newest_published and s.snapshot_id != live
               and now - snapshot_time(s.snapshot_id) >= grace]
    # A retention stopped half way (killed, throttled) left its mark: that decision stands.
    doomed += [s.snapshot_id for s in snapshots if s.state == "retiring" and s.snapshot_id != live]
    deleted = []
    for snapshot_id in sorted(doomed):
        if _retire(storage, index_name, snapshot_id, grace, now):
            deleted.append(snapshot_id)
    return deleted


def _retire(storage: Storage, index_name: str, snapshot_id: str, grace: timedelta, now: datetime) -> bool:
    """Delete one snapshot directory unless someone is about to use it. Retention marks it first, then
    looks at LATEST and the holds; publish and rollback hold first, then look for the mark: whichever
    order their requests land in, one of the two sees the other and backs off."""
    marker = retiring_key(index_name, snapshot_id)
    storage.write_text(marker, json.dumps({"since": now.isoformat()}))
    pointer = read_latest(storage, index_name)
    if (pointer and pointer["snapshot_id"] == snapshot_id) or snapshot_id in _held(storage, index_name, grace, now):
        storage.delete(marker)
        return False
    prefix = snapshot_prefix(index_name, snapshot_id)
    # The manifest goes first: a half-deleted snapshot then reads as retiring or incomplete, never as published.
    storage.delete(prefix + MANIFEST_FILE)
    storage.delete_prefix(prefix)
    return True


def rollback(storage: Storage, index_name: str, to_snapshot_id: str) -> dict:
    """Point LATEST at an earlier published snapshot after re-verifying every one of its files; LATEST moves
    by compare-and-swap from what it named before verification (LatestMoved otherwise)."""
    check_snapshot_id(to_snapshot_id, "--to", PublishError)
    pointer, _ = read_latest_versioned(storage, index_name, strict=False)
    expected = pointer["snapshot_id"] if pointer else None
    if pointer and pointer["snapshot_id"] == to_snapshot_id:
        raise PublishError(f"LATEST already points to {to_snapshot_id}")
    prefix = snapshot_prefix(index_name, to_snapshot_id)
    with hold(storage, index_name, to_snapshot_id, "rollback"):
        if not storage.exists(prefix + MANIFEST_FILE):
            published = [s.snapshot_id for s in list_snapshots(storage, index_name) if s.state in ("live", "published")]
            raise PublishError(f"{to_snapshot_id} is not a published snapshot of index {index_name!r} "
                               f"(published: {', '.join(published) or 'none'})")
        manifest, data = load_manifest(storage, index_name, to_snapshot_id)
        verify_snapshot_files(storage, prefix, manifest["files"])
        swap_latest(storage, index_name, expected, to_snapshot_id, _sha256(data), "rollback")
    return manifest
