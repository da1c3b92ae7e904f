"""Readers of committed stage outputs: what a later stage, a later night or the report may read.

A stage's outputs count only once its commit marker exists (`_SUCCESS.json`); these readers
check it and read through the schemas of schemas.tables, so every consumer reads the same rows
the same way. They never write, and never import a stage package.
"""
from __future__ import annotations

import json

import pandas as pd

from pipelines import layout
from pipelines.errors import StageRefused
from pipelines.storage import Storage
from schemas.tables import DEDUP_IMAGES, EMBEDDINGS, IMAGE_STATE, QUARANTINE

# Stages whose row-level validation quarantines rows (pipelines.validate).
VALIDATED_STAGES = ("manifest", "images", "embeddings", "index")


class NotCommitted(StageRefused):
    """An upstream stage's output is missing or not committed; the message names the command to run."""


# ---------------------------------------------------------------------------------------
# crawl: runs/<run>/crawl/state/, images/
# ---------------------------------------------------------------------------------------

def committed_crawl_runs(storage: Storage) -> list[str]:
    return [r for r in storage.list_dirs(layout.RUNS_ROOT) if storage.exists(layout.crawl_success_key(r))]


def previous_crawl_run(storage: Storage, run_id: str) -> str | None:
    """The latest committed crawl run that sorts before `run_id` (run ids sort in time order)."""
    earlier = [r for r in committed_crawl_runs(storage) if r < run_id]
    return max(earlier) if earlier else None


def read_crawl_state(storage: Storage, run_id: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Every image row of a committed crawl run (status fetched/not_modified/stale/carried/removed)."""
    return storage.read_table(layout.crawl_state_prefix(run_id), columns=columns, schema=IMAGE_STATE).to_pandas()


LIVE_STATUSES = ("fetched", "not_modified", "stale", "carried")


def read_current_images(storage: Storage, run_id: str, categories: list[str] | None = None,
                        with_bytes: bool = False) -> pd.DataFrame:
    """The catalog's images as of committed crawl run `run_id`: one row per (product, image URL)
    that is live (not removed), optionally with the bytes read from where they are stored."""
    if not storage.exists(layout.crawl_success_key(run_id)):
        raise NotCommitted(f"crawl run {run_id} is not committed in {storage.uri} (no {layout.crawl_success_key(run_id)}): "
                           f"run `catalog-index crawl --run-id {run_id}` first")
    state = read_crawl_state(storage, run_id)
    state = state[state["status"].isin(LIVE_STATUSES)]
    if categories:
        state = state[state["category"].isin(categories)]
    state = state.reset_index(drop=True)
    if with_bytes:
        blobs = {}
        for key in sorted(state["stored_key"].dropna().unique()):
            part = storage.read_parquet_file(key, columns=["sha256", "image"]).to_pydict()
            blobs.update(zip(part["sha256"], part["image"]))
        state["image"] = [blobs.get(sha) for sha in state["sha256"]]
    return state


# ---------------------------------------------------------------------------------------
# dedup: dedup/<run>/
# ---------------------------------------------------------------------------------------

def committed_dedup_runs(storage: Storage) -> list[str]:
    return [r for r in storage.list_dirs(layout.DEDUP_ROOT) if r != layout.HASHES_FOLDER and storage.exists(layout.dedup_success_key(r))]


def previous_dedup_run(storage: Storage, run_id: str) -> str | None:
    earlier = [r for r in committed_dedup_runs(storage) if r < run_id]
    return max(earlier) if earlier else None


def require_committed_dedup(storage: Storage, run_id: str | None) -> str:
    """`run_id` if its dedup output is committed (default: the newest committed dedup run); else NotCommitted.
    build-index reads dedup output: a half-written one (a killed dedup) must never be indexed."""
    if run_id is None:
        runs = committed_dedup_runs(storage)
        if not runs:
            raise NotCommitted(f"no committed dedup run in {storage.uri}: run `catalog-index dedup --run-id ID` first")
        return max(runs)
    if not storage.exists(layout.dedup_success_key(run_id)):
        raise NotCommitted(f"dedup run {run_id} is not committed in {storage.uri} (no {layout.dedup_success_key(run_id)}): "
                           f"run `catalog-index dedup --run-id {run_id}` first")
    return run_id


def backfill_index_scope(storage: Storage, run_id: str, categories: list[str] | None) -> list[str] | None:
    """The categories a backfill's index must rebuild: its own, plus those that its moved products left or
    joined (the crawl summary's `index_scope`), so a moved product is found in its new category only."""
    if not categories:
        return categories
    key = layout.crawl_success_key(run_id)
    scope = json.loads(storage.read_text(key)).get("index_scope") if storage.exists(key) else None
    return sorted(set(categories) | set(scope or []))


def read_dedup_images(storage: Storage, run_id: str) -> pd.DataFrame:
    if not storage.exists(layout.dedup_success_key(run_id)):
        raise NotCommitted(f"dedup run {run_id} is not committed in {storage.uri}: run `catalog-index dedup "
                         f"--run-id {run_id}` first")
    return storage.read_table(layout.dedup_images_key(run_id), schema=DEDUP_IMAGES).to_pandas()


# ---------------------------------------------------------------------------------------
# embed: embeddings/<model_version>/, quarantine/<run>/embed/
# ---------------------------------------------------------------------------------------

def read_embeddings(storage: Storage, version: str, columns: list[str] | None = None) -> pd.DataFrame:
    """The cached vectors of one model version (latest per sha256 if a rerun wrote it twice)."""
    table = storage.read_table(layout.embeddings_prefix(version), columns=columns, schema=EMBEDDINGS).to_pandas()
    return table.drop_duplicates("sha256", keep="last").reset_index(drop=True)


def failed_shas(storage: Storage, run_id: str) -> set[str]:
    return set(storage.read_table(layout.quarantine_prefix(run_id, "embed"), columns=["sha256"],
                                  schema=QUARANTINE).column("sha256").to_pylist())


# ---------------------------------------------------------------------------------------
# quarantine
# ---------------------------------------------------------------------------------------

def quarantined_sha256s(storage: Storage, run_id: str, stage: str) -> set[str]:
    """Images (sha256) a stage quarantined in this run: validate stages (`images`, `embeddings`)
    or, with `stage="embed"`, the embed stage's own failures. Every row-level check of the
    images suite is a property of the bytes, so all rows of one sha256 pass or fail together."""
    if stage in VALIDATED_STAGES:
        key = layout.validation_quarantine_key(run_id, stage)
        if not storage.exists(key):
            return set()
        table = storage.read_table(key, columns=["sha256"])
    else:
        table = storage.read_table(layout.quarantine_prefix(run_id, stage), columns=["sha256"], schema=QUARANTINE)
    return {sha for sha in table.column("sha256").to_pylist() if sha}
