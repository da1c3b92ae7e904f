"""Where each table lives in the warehouse (see DESIGN.md, "Storage layout").

Every key the stages read or write is built here and nowhere else, so the layout can be
read in one place (tests/test_layering.py checks that no other module spells a top-level
warehouse folder). Keys are relative to the warehouse root and use "/" on every backend.

    runs/<run>/manifest.parquet, runs/<run>/crawl/..., runs/<run>/embed/_SUCCESS.json
    images/category=<c>/run_id=<run>/part-*.parquet      image bytes, by the run that fetched them
    quarantine/<run>/<stage>/...                          rejected rows with a reason code
    dedup/<run>/..., dedup/hashes/v<version>-<mode>/      clusters; the pHash cache by sha256
    embeddings/<model_version>/                           sha256 -> vector (a cache)
    models/pca/..., models/heads/...                      fitted PCA, trained projection heads
    indexes/<name>/<snapshot_id>/, indexes/<name>/LATEST  snapshots and the live pointer
    reports/<run>/                                        run report, validation results, Data Docs
"""
from __future__ import annotations

import re
from pathlib import Path
from datetime import datetime, timezone
from urllib.parse import quote, unquote

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def new_run_id(now: datetime | None = None) -> str:
    """Default run id: UTC time, which sorts in run order (`20261123T031500Z`)."""
    return (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-128 characters of letters, digits and . _ : + - "
                         "(run ids sort in time order: use e.g. 20261123T031500Z or 2026-11-23)")
    return run_id


def partition_value(value: str) -> str:
    """Hive-style partition value: any category name becomes one safe path segment."""
    return quote(value, safe="")


def partition_name(segment: str) -> str:
    return unquote(segment)


def run_prefix(run_id: str) -> str:
    return f"runs/{run_id}/"


def manifest_key(run_id: str) -> str:
    return f"runs/{run_id}/manifest.parquet"


def crawl_prefix(run_id: str) -> str:
    return f"runs/{run_id}/crawl/"


def crawl_state_prefix(run_id: str) -> str:
    return f"runs/{run_id}/crawl/state/"


def crawl_success_key(run_id: str) -> str:
    return f"runs/{run_id}/crawl/_SUCCESS.json"


def images_key(category: str, run_id: str, part: str) -> str:
    return f"images/category={partition_value(category)}/run_id={run_id}/part-{part}.parquet"


def images_category_prefix(category: str) -> str:
    return f"images/category={partition_value(category)}/"


def quarantine_prefix(run_id: str, stage: str) -> str:
    return f"quarantine/{run_id}/{stage}/"


REPORTS_ROOT = "reports"


def reports_prefix(run_id: str) -> str:
    return f"reports/{run_id}/"


def crawl_task_marker_key(run_id: str, part: str) -> str:
    return f"{crawl_prefix(run_id)}tasks/part-{part}.json"


def images_run_prefix(category_segment: str, run_id: str) -> str:
    """One run's image files in one category folder (`category_segment` as listed: `category=<c>`)."""
    return f"images/{category_segment}/run_id={run_id}/"


IMAGES_ROOT = "images"
RUNS_ROOT = "runs"


# --- dedup ----------------------------------------------------------------------------

DEDUP_ROOT = "dedup"
HASHES_FOLDER = "hashes"  # dedup/hashes/ holds the pHash cache, not a run


def dedup_prefix(run_id: str) -> str:
    return f"dedup/{run_id}/"


def dedup_images_key(run_id: str) -> str:
    """Every live image row -> its cluster's canonical_sha256 (schemas.tables.DEDUP_IMAGES)."""
    return f"dedup/{run_id}/images.parquet"


def dedup_pairs_key(run_id: str) -> str:
    return f"dedup/{run_id}/pairs.parquet"


def dedup_rules_key(run_id: str) -> str:
    return f"dedup/{run_id}/rules.json"


def dedup_success_key(run_id: str) -> str:
    return f"dedup/{run_id}/_SUCCESS.json"


def hash_cache_prefix(hash_version: int, draft_size: int | None) -> str:
    """pHashes are cached per sha256, per decode mode (a drafted JPEG decode hashes differently)
    and per hash version."""
    return f"dedup/hashes/v{hash_version}-{'exact' if draft_size is None else f'draft{draft_size}'}/"


# --- embed ----------------------------------------------------------------------------

EMBEDDINGS_ROOT = "embeddings"


def embeddings_prefix(model_version: str) -> str:
    return f"embeddings/{model_version}/"


def embed_success_key(run_id: str) -> str:
    return f"runs/{run_id}/embed/_SUCCESS.json"


def pca_key(model_version: str, dim: int, whiten: bool) -> str:
    return f"models/pca/{model_version}-d{dim}{'-whiten' if whiten else ''}.npz"


HEADS_PREFIX = "models/heads/"
ADOPTED_HEAD_KEY = "models/heads/ADOPTED.json"


def head_prefix(head_version: str) -> str:
    return f"{HEADS_PREFIX}{head_version}/"


# --- indexes --------------------------------------------------------------------------

INDEXES_ROOT = "indexes"


def index_prefix(name: str) -> str:
    return f"indexes/{name}/"


def snapshot_prefix(name: str, snapshot_id: str) -> str:
    return f"indexes/{name}/{snapshot_id}/"


def latest_key(name: str) -> str:
    return f"indexes/{name}/LATEST"


def latest_uri(warehouse: str, name: str) -> str:
    """The full URI of an index's LATEST pointer (the Airflow asset a publish updates). One warehouse
    gets one URI however it is spelt (`/srv/wh`, `file:///srv/wh/`, `file:///srv/x/../wh`;
    `s3://b//p/`), so a publish and the serving DAG scheduled on it always meet."""
    return f"{canonical_warehouse(warehouse)}/{latest_key(name)}"


def canonical_warehouse(warehouse: str) -> str:
    """`warehouse` as a URI without a trailing slash: a local path becomes an absolute file:// URI
    (symlinks resolved), an s3:// URI loses empty path segments."""
    if warehouse.startswith("s3://"):
        bucket, _, prefix = warehouse[len("s3://"):].partition("/")
        parts = [part for part in prefix.split("/") if part]
        return "/".join([f"s3://{bucket}", *parts])
    path = unquote(warehouse[len("file://"):]) if warehouse.startswith("file://") else warehouse
    if "://" in path:  # another scheme: left as given
        return warehouse.rstrip("/")
    return Path(path).expanduser().resolve().as_uri()


def build_staging_prefix(snapshot_prefix_: str) -> str:
    """Scratch files of a build in progress (members, routed vectors), deleted when it ends."""
    return f"{snapshot_prefix_}_staging/"


def staging_members_key(staging_prefix: str, shard_id: str) -> str:
    return f"{staging_prefix}members-{shard_id}.parquet"


def routed_vectors_key(staging_prefix: str, shard_id: str, route_task: int) -> str:
    return f"{staging_prefix}vectors/{shard_id}/route-{route_task:05d}.parquet"
def holds_prefix(name: str) -> str:
    """indexes/<name>/_holds/: one small file per snapshot a publish or rollback is working on;
    retention keeps a held snapshot. Not a snapshot directory (ids never start with '_')."""
    return f"indexes/{name}/_holds/"


def hold_key(name: str, snapshot_id: str, token: str) -> str:
    return f"{holds_prefix(name)}{snapshot_id}--{token}.json"


def retiring_key(name: str, snapshot_id: str) -> str:
    """Written by retention before it deletes a snapshot; a rollback or publish that finds it backs off."""
    return f"indexes/{name}/{snapshot_id}/_retiring.json"


def cas_probe_key(name: str, token: str) -> str:
    return f"indexes/{name}/_holds/probe-{token}"


# --- validation and reports -----------------------------------------------------------

def validation_quarantine_key(run_id: str, stage: str) -> str:
    return f"{quarantine_prefix(run_id, 'validate')}{stage}.parquet"


def validation_report_key(run_id: str, stage: str) -> str:
    return f"{reports_prefix(run_id)}validation/{stage}.json"


def validation_reports_prefix(run_id: str) -> str:
    return f"{reports_prefix(run_id)}validation/"


def validation_docs_prefix(run_id: str, stage: str) -> str:
    return f"{reports_prefix(run_id)}gx/{stage}/"


def missing_embedding_quarantine_key(run_id: str) -> str:
    return f"{quarantine_prefix(run_id, 'index')}missing_embedding.parquet"
