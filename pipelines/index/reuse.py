"""Unchanged-shard detection: which planned shards the live snapshot already holds, built from
the same member rows (`_members_digest`), model version and index settings, so that a nightly
build copies them instead of rebuilding them (`index.reuse_unchanged_shards`).

This module only reads `LATEST`, a manifest and a `_build.json`; it must never write to the
warehouse nor decide what gets rebuilt on a category backfill (the driver does).
"""
from __future__ import annotations

import json

import pyarrow as pa

from pipelines.config import IndexSettings
from pipelines.fingerprint import rows_digest
from pipelines.index.plan import ShardPlan
from pipelines.layout import snapshot_prefix
from pipelines.snapshot import BUILD_FILE, BUILD_MAX_BYTES, read_latest, read_manifest
from pipelines.storage import Storage


def _members_digest(rows: pa.Table) -> str:
    """Fingerprint of a shard's member rows, whatever their order: what the shard is built from
    (with the model version, whose vectors are immutable, and the index settings)."""
    return rows_digest(rows, rows.column_names)


def _unchanged_shards(storage: Storage, cfg: IndexSettings, version: str, plans: list[ShardPlan],
                      digests: dict[str, str]):
    """(live snapshot id, [(plan, its unchanged shard there)], dimension), or None: the shards of
    the snapshot `LATEST` points to that have the same categories and member rows as a planned
    shard, built with the same model version and index settings."""
    pointer = read_latest(storage, cfg.name)
    if pointer is None:
        return None
    previous_id = pointer["snapshot_id"]
    build_key = snapshot_prefix(cfg.name, previous_id) + BUILD_FILE
    build = json.loads(storage.read_text(build_key, BUILD_MAX_BYTES)) if storage.exists(build_key) else {}
    ignore = {"keep_snapshots", "retention_grace_hours", "reuse_unchanged_shards", "min_recall", "use_gpu"}
    if {k: v for k, v in (build.get("settings") or {}).items() if k not in ignore} != \
            {k: v for k, v in cfg.model_dump().items() if k not in ignore}:
        return None
    previous = read_manifest(storage, cfg.name, previous_id)
    if previous["model"]["version"] != version:
        return None
    by_content = {(tuple(s["categories"]), s.get("members_sha256")): s for s in previous["shards"]
                  if s.get("members_sha256")}
    kept = [(plan, by_content[(tuple(plan.categories), digests[plan.shard_id])]) for plan in plans
            if (tuple(plan.categories), digests[plan.shard_id]) in by_content]
    return (previous_id, kept, previous["dimension"]) if kept else None
