"""Crawl stage: manifest -> images table, incrementally, with every row accounted for.

Driver side (`run_crawl`): read and normalise the manifest, quarantine unusable rows,
join the previous committed run's state (for conditional requests), cut the work into
tasks, dispatch them (Spark or local), then write the removed/carried rows, the summary
and the `_SUCCESS.json` commit marker, last.

Task side (`crawl_task`): fetch one slice of rows concurrently, check every body is a
real image, and write three files owned by the task alone: the image bytes
(`images/category=<c>/run_id=<r>/part-<task>.parquet`), the state rows
(`runs/<r>/crawl/state/part-<task>.parquet`) and the quarantined rows. A task marker
written after them makes a killed run resumable: a rerun of the same run id and the
same manifest skips the tasks that finished.

Every manifest row ends in exactly one of: fetched, not_modified, stale (the fetch
failed in a way that says nothing about the image, last good bytes kept), quarantined
(with a reason), or out_of_scope (a category outside `--categories`). The summary checks that these add up to the manifest's row count.
"""
from __future__ import annotations

import hashlib
import json
import math
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa

from pipelines import layout
from pipelines.config import CrawlSettings, S3Settings, Settings
from pipelines.crawl.fetch import Fetcher
from pipelines.crawl.image_check import ImageRejected, inspect_image
from pipelines.crawl.manifest import read_manifest, split_manifest_rows
from pipelines.guarded_http import Deadline, short
from pipelines.readers import (LIVE_STATUSES, committed_crawl_runs, previous_crawl_run,  # noqa: F401
                               read_crawl_state, read_current_images)
from pipelines.storage import Storage, open_storage
from schemas.reasons import INTERNAL_ERROR, TRANSIENT_REASONS, UNEXPECTED_304, WIRE_FAILURE_REASONS
from schemas.tables import IMAGE_STATE, IMAGES, QUARANTINE
from pipelines.errors import StageRefused
from schemas.tables import MANIFEST
from pipelines.spark import default_parallelism, run_tasks

_PREV = ["sha256", "byte_size", "format", "width", "height", "http_status", "etag", "last_modified",
         "content_type", "final_url", "fetched_at", "stored_run_id", "stored_key", "status"]


def _worklist_schema() -> pa.Schema:
    return pa.schema(list(MANIFEST) + [IMAGE_STATE.field(c).with_name(f"prev_{c}").with_nullable(True) for c in _PREV])


WORKLIST = _worklist_schema()


class CrawlError(StageRefused):
    """The crawl could not run at all (bad manifest, unreachable warehouse)."""


@dataclass
class CrawlTask:
    warehouse: str
    s3: S3Settings
    crawl: CrawlSettings
    run_id: str
    part: str
    worklist_key: str


@dataclass
class CrawlSummary:
    run_id: str
    manifest_uri: str
    previous_run_id: str | None
    categories: list[str] | None
    manifest_rows: int
    fetched: int = 0
    not_modified: int = 0
    stale: int = 0
    quarantined: int = 0
    out_of_scope: int = 0
    removed: int = 0
    carried: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    stale_reasons: dict[str, int] = field(default_factory=dict)
    bytes_downloaded: int = 0
    tasks: int = 0
    tasks_resumed: int = 0
    elapsed_s: float = 0.0
    fetch_s: float = 0.0
    per_category: dict[str, dict[str, int]] = field(default_factory=dict)
    moved: int = 0                                   # (product, image) rows whose category changed since the last run
    index_scope: list[str] | None = None             # a backfill's categories plus those its moved rows left or joined
    refetched_lost_bytes: int = 0                    # previous rows whose stored bytes were gone: fetched unconditionally

    @property
    def accounted(self) -> int:
        return self.fetched + self.not_modified + self.stale + self.quarantined + self.out_of_scope

    def to_json(self) -> str:
        data = asdict(self)
        data["accounted"] = self.accounted
        return json.dumps(data, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------
# task side
# ---------------------------------------------------------------------------------------

def _now() -> pd.Timestamp:
    return pd.Timestamp(datetime.now(timezone.utc))


def _has_previous_bytes(row: dict) -> bool:
    return bool(row.get("prev_stored_key")) and row.get("prev_status") != "removed"


def crawl_row(row: dict, fetcher: Fetcher, settings: CrawlSettings, run_id: str) -> tuple[str, dict]:
    """Fetch and check one worklist row. Returns (kind, record) with kind in
    fetched | not_modified | stale | quarantined. Never raises: whatever one row does ends
    as that row's outcome, never as the task's failure."""
    try:
        return _crawl_row(row, fetcher, settings)
    except Exception as exc:  # last resort: a bug met on this row quarantines the row, with the exception
        return "quarantined", {**{k: row.get(k) for k in ("product_id", "category", "image_url", "title")},
                               "row_index": row.get("row_index"), "reason": INTERNAL_ERROR,
                               "detail": short(f"{type(exc).__name__}: {exc}", 500), "http_status": None, "at": _now()}


def _crawl_row(row: dict, fetcher: Fetcher, settings: CrawlSettings) -> tuple[str, dict]:
    base = {k: row.get(k) for k in ("product_id", "category", "image_url", "title")}
    conditional = _has_previous_bytes(row)
    started = _now()
    result = fetcher.fetch(row["image_url"], etag=row.get("prev_etag") if conditional else None,
                           last_modified=row.get("prev_last_modified") if conditional else None)
    reason, detail = result.reason, result.detail
    if result.outcome == "ok":
        try:
            info = inspect_image(result.data, settings.allowed_formats, settings.max_pixels, settings.min_side)
        except ImageRejected as exc:
            reason, detail = exc.reason, exc.detail
        else:
            sha = hashlib.sha256(result.data).hexdigest()
            http = dict(http_status=result.http_status, etag=result.etag, last_modified=result.last_modified,
                        content_type=result.content_type, final_url=result.final_url)
            if conditional and sha == row.get("prev_sha256"):
                # The server ignored the conditional request but the bytes are unchanged:
                # keep the stored copy instead of storing the same bytes again.
                return "not_modified", {**base, **_previous(row), **http, "status": "not_modified",
                                        "checked_at": started}
            return "fetched", {**base, **http, "sha256": sha, "byte_size": len(result.data), "format": info.format,
                               "width": info.width, "height": info.height, "fetched_at": started,
                               "checked_at": started, "status": "fetched", "image": result.data}
    elif result.outcome == "not_modified":
        if conditional:
            http = {k: v for k, v in dict(http_status=304, etag=result.etag, last_modified=result.last_modified).items()
                    if v is not None}
            return "not_modified", {**base, **_previous(row), **http, "status": "not_modified", "checked_at": started}
        reason, detail = UNEXPECTED_304, "HTTP 304 to an unconditional request"
    wire_failure = result.outcome == "failed" and reason in WIRE_FAILURE_REASONS
    if conditional and (reason in TRANSIENT_REASONS or wire_failure):
        return "stale", {**base, **_previous(row), "status": "stale", "error": reason, "checked_at": started}
    return "quarantined", {**base, "row_index": row["row_index"], "reason": reason, "detail": detail,
                           "http_status": result.http_status, "at": started}


def crawl_rows(rows: list[dict], fetcher: Fetcher, settings: CrawlSettings, run_id: str) -> list[tuple[str, dict]]:
    """crawl_row over `rows`, in order, `settings.concurrency` at a time. A row still running
    after `settings.slow_fetch_s` stops counting (up to `concurrency` such rows more), so a few
    servers that trickle until the deadline do not take the task's threads from the good rows."""
    gate = threading.BoundedSemaphore(settings.concurrency)

    def run(row: dict) -> tuple[str, dict]:
        gate.acquire()
        lock, released = threading.Lock(), []

        def release() -> None:
            with lock:
                if not released:
                    released.append(True)
                    gate.release()

        try:
            with Deadline(settings.slow_fetch_s, on_expire=release):
                return crawl_row(row, fetcher, settings, run_id)
        finally:
            release()

    with ThreadPoolExecutor(max_workers=2 * settings.concurrency) as pool:
        return list(pool.map(run, rows))


def _previous(row: dict) -> dict:
    out = {k: row.get(f"prev_{k}") for k in _PREV if k != "status"}
    return out


def _table(records: list[dict], schema: pa.Schema) -> pa.Table:
    columns = {f.name: [r.get(f.name) for r in records] for f in schema}
    return pa.table(columns, schema=schema)


def crawl_task(task: CrawlTask) -> dict[str, Any]:
    """Crawl one slice of the worklist and write the task's own output files."""
    storage = open_storage(task.warehouse, task.s3)
    rows = storage.read_parquet_file(task.worklist_key).to_pylist()
    fetcher = Fetcher(task.crawl, task.s3)
    try:
        outcomes = crawl_rows(rows, fetcher, task.crawl, task.run_id)
    finally:
        fetcher.close()

    state, quarantined, by_category = [], [], {}
    for kind, record in outcomes:
        record["run_id"] = task.run_id
        if kind == "quarantined":
            record["stage"] = "crawl"
            quarantined.append(record)
            continue
        if kind == "fetched":
            by_category.setdefault(record["category"], []).append(record)
        state.append(record)
    bytes_downloaded = 0
    for category, records in sorted(by_category.items()):
        key = layout.images_key(category, task.run_id, task.part)
        for record in records:
            record["stored_run_id"], record["stored_key"] = task.run_id, key
            bytes_downloaded += record["byte_size"]
        storage.write_table(key, _table(records, IMAGES), compression="none")  # images are already compressed
    storage.write_table(f"{layout.crawl_state_prefix(task.run_id)}part-{task.part}.parquet", _table(state, IMAGE_STATE))
    storage.write_table(f"{layout.quarantine_prefix(task.run_id, 'crawl')}part-{task.part}.parquet",
                        _table(quarantined, QUARANTINE))
    counts = {
        "part": task.part,
        "kinds": dict(Counter(kind for kind, _ in outcomes)),
        "quarantine_reasons": dict(Counter(r["reason"] for r in quarantined)),
        "stale_reasons": dict(Counter(r["error"] for r in state if r["status"] == "stale")),
        "per_category": _per_category(outcomes),
        "bytes_downloaded": bytes_downloaded,
    }
    storage.write_text(_task_marker(task.run_id, task.part), json.dumps(counts))
    return counts


def _per_category(outcomes: list[tuple[str, dict]]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter] = {}
    for kind, record in outcomes:
        table.setdefault(record["category"], Counter())[kind] += 1
    return {c: dict(v) for c, v in table.items()}


def _task_marker(run_id: str, part: str) -> str:
    return layout.crawl_task_marker_key(run_id, part)


# ---------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------

def _digest(frame: pd.DataFrame, extra: dict) -> str:
    h = hashlib.sha256(pd.util.hash_pandas_object(frame.astype(str), index=False).values.tobytes())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()


def plan_task_count(rows: int, rows_per_task: int, parallelism: int) -> int:
    """Enough tasks to bound each one's size, and enough to keep every core busy."""
    if rows == 0:
        return 0
    return max(math.ceil(rows / rows_per_task), min(parallelism, math.ceil(rows / 32)))


class HistoryRewrite(CrawlError):
    """The run id sorts before the newest committed run: running it would rewrite history."""


def check_run_order(storage: Storage, run_id: str, rewrite_history: bool = False) -> None:
    """Refuse a run id older than the newest committed crawl: later runs took it as their history (the
    previous crawl, the previous good run, where image bytes live), so it must not change under them."""
    newest = max(committed_crawl_runs(storage), default=None)
    if newest is None or run_id >= newest or rewrite_history:
        return
    raise HistoryRewrite(
        f"run id {run_id} sorts before the newest committed run {newest}: run ids sort in time order and later "
        "runs depend on earlier ones, so this run is refused. Start a new run instead (no --run-id: the current "
        "time; in Airflow, trigger catalog_nightly_reindex again, without a logical date); to redo some "
        "categories use the catalog_backfill DAG (`catalog-index backfill --categories ...`). To rerun this "
        "old night anyway, pass --rewrite-history (DAG param rewrite_history)")


def run_crawl(settings: Settings, manifest_uri: str, run_id: str, *, categories: list[str] | None = None,
              runner: str = "spark", spark=None, resume: bool = True, rewrite_history: bool = False) -> CrawlSummary:
    started = time.monotonic()
    layout.check_run_id(run_id)
    storage = open_storage(settings.warehouse, settings.s3)
    check_run_order(storage, run_id, rewrite_history)
    manifest = read_manifest(manifest_uri, settings.s3, settings.crawl)
    storage.write_table(layout.manifest_key(run_id), manifest)
    frame = manifest.to_pandas()
    previous = previous_crawl_run(storage, run_id)

    in_scope = frame if not categories else frame[frame["category"].astype("string").str.strip().isin(categories)]
    out_of_scope = len(frame) - len(in_scope)
    to_crawl, rejected = split_manifest_rows(in_scope, settings.crawl.max_url_length)

    prev_state = read_crawl_state(storage, previous) if previous else IMAGE_STATE.empty_table().to_pandas()
    prev_state = prev_state[prev_state["status"] != "removed"]
    to_refresh, lost = _forget_lost_bytes(storage, prev_state)
    prev_cols = to_refresh[["product_id", "image_url", *_PREV]].rename(columns={c: f"prev_{c}" for c in _PREV})
    worklist = to_crawl.merge(prev_cols, on=["product_id", "image_url"], how="left")
    worklist = worklist.sort_values(["category", "row_index"], kind="stable").reset_index(drop=True)

    if runner == "spark" and callable(spark):
        spark = spark()  # started only now: a bad manifest fails in a second, not after Spark's start-up
    parallelism = default_parallelism(spark) if runner == "spark" else 1
    n_tasks = plan_task_count(len(worklist), settings.crawl.rows_per_task, parallelism)
    plan = {"manifest_digest": _digest(frame, {"categories": sorted(categories or [])}), "previous_run_id": previous,
            "tasks": n_tasks, "crawl_settings": settings.crawl.model_dump()}
    plan_key = f"{layout.crawl_prefix(run_id)}plan.json"
    old_plan = json.loads(storage.read_text(plan_key)) if storage.exists(plan_key) else None
    resuming = resume and old_plan is not None and {k: v for k, v in old_plan.items() if k != "attempt"} == plan
    # Each fresh attempt names its files anew (part-<task>-<attempt>): a file of an earlier attempt that a
    # later run still reads bytes from is kept (see _clear_run_outputs), never overwritten with other rows.
    attempt = old_plan.get("attempt", "") if resuming else secrets.token_hex(4)
    if not resuming:
        _clear_run_outputs(storage, run_id)
        storage.write_text(plan_key, json.dumps({**plan, "attempt": attempt}, indent=2, sort_keys=True))

    tasks, results = [], {}
    bounds = [round(i * len(worklist) / n_tasks) for i in range(n_tasks + 1)] if n_tasks else [0]
    for i in range(n_tasks):
        part = f"{i:05d}-{attempt}" if attempt else f"{i:05d}"
        marker = _task_marker(run_id, part)
        if resuming and storage.exists(marker):
            results[part] = json.loads(storage.read_text(marker))
            continue
        key = f"{layout.crawl_prefix(run_id)}worklist/part-{part}.parquet"
        storage.write_table(key, pa.Table.from_pandas(worklist.iloc[bounds[i]:bounds[i + 1]], schema=WORKLIST,
                                                      preserve_index=False))
        tasks.append(CrawlTask(settings.warehouse, settings.s3, settings.crawl, run_id, part, key))

    fetch_started = time.monotonic()
    for counts in run_tasks(crawl_task, tasks, runner=runner, spark=spark, description="crawl",
                            job_group=f"crawl-{run_id}"):
        results[counts["part"]] = counts
    fetch_s = time.monotonic() - fetch_started

    summary = CrawlSummary(run_id=run_id, manifest_uri=manifest_uri, previous_run_id=previous,
                           categories=sorted(categories) if categories else None, manifest_rows=len(frame),
                           out_of_scope=out_of_scope, tasks=n_tasks, tasks_resumed=n_tasks - len(tasks),
                           refetched_lost_bytes=lost)
    _write_driver_rows(storage, run_id, rejected, frame, in_scope, prev_state, categories, summary)
    reasons, stale_reasons, per_category = Counter(summary.quarantine_reasons), Counter(), {}
    for counts in results.values():
        kinds = counts["kinds"]
        summary.fetched += kinds.get("fetched", 0)
        summary.not_modified += kinds.get("not_modified", 0)
        summary.stale += kinds.get("stale", 0)
        summary.quarantined += kinds.get("quarantined", 0)
        reasons.update(counts["quarantine_reasons"])
        stale_reasons.update(counts["stale_reasons"])
        summary.bytes_downloaded += counts["bytes_downloaded"]
        for category, kinds_ in counts["per_category"].items():
            per_category.setdefault(category, Counter()).update(kinds_)
    for _, row in rejected.iterrows():
        per_category.setdefault(str(row["category"]), Counter())["quarantined"] += 1
    summary.quarantine_reasons = dict(sorted(reasons.items()))
    summary.stale_reasons = dict(sorted(stale_reasons.items()))
    summary.per_category = {c: dict(v) for c, v in sorted(per_category.items())}
    summary.elapsed_s = round(time.monotonic() - started, 3)
    summary.fetch_s = round(fetch_s, 3)
    if summary.accounted != summary.manifest_rows:
        raise CrawlError(f"accounting mismatch in run {run_id}: {summary.accounted} rows accounted for, "
                         f"{summary.manifest_rows} in the manifest; outputs are not committed")
    _check_unique_state(storage, run_id)
    storage.write_text(f"{layout.crawl_prefix(run_id)}summary.json", summary.to_json())
    storage.write_text(layout.crawl_success_key(run_id), summary.to_json())  # commit marker, written last
    return summary


def _clear_run_outputs(storage: Storage, run_id: str) -> None:
    """A fresh attempt at run_id replaces that run's outputs and nothing else. Image files of this run
    that a later committed run still reads bytes from (its not_modified / stale / carried rows) are
    kept: those bytes belong to that run's state too (invariant 5)."""
    storage.delete_prefix(layout.crawl_prefix(run_id))
    storage.delete_prefix(layout.quarantine_prefix(run_id, "crawl"))
    ours = [key for segment in storage.list_dirs(layout.IMAGES_ROOT)
            for key in storage.list(layout.images_run_prefix(segment, run_id))]
    if not ours:
        return
    referenced = _referenced_image_keys(storage, [r for r in committed_crawl_runs(storage) if r > run_id])
    for key in ours:
        if key not in referenced:
            storage.delete(key)


def _referenced_image_keys(storage: Storage, runs: list[str]) -> set[str]:
    keys: set[str] = set()
    for run in runs:
        state = read_crawl_state(storage, run, columns=["stored_key", "status"])
        keys.update(state.loc[state["status"].isin(LIVE_STATUSES), "stored_key"].dropna())
    return keys


def _forget_lost_bytes(storage: Storage, prev_state: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Previous rows whose image file is gone (deleted by hand, lost by an old rerun) lose their HTTP
    validators and stored key, so that this run fetches them unconditionally: a 304 must not keep a
    reference to bytes that no longer exist, night after night."""
    if prev_state.empty:
        return prev_state, 0
    present = set(storage.list(layout.IMAGES_ROOT + "/"))
    lost = prev_state["stored_key"].notna() & ~prev_state["stored_key"].isin(present)
    if not lost.any():
        return prev_state, 0
    prev_state = prev_state.copy()
    prev_state.loc[lost, ["stored_key", "stored_run_id", "etag", "last_modified", "sha256"]] = None
    return prev_state, int(lost.sum())


def _check_unique_state(storage: Storage, run_id: str) -> None:
    """Invariant 1, checked before the commit marker: one state row per (product_id, image_url)."""
    keys = read_crawl_state(storage, run_id, columns=["product_id", "image_url"])
    duplicated = keys[keys.duplicated(keep=False)]
    if len(duplicated):
        sample = ", ".join(f"({p}, {u})" for p, u in duplicated.drop_duplicates().head(3).itertuples(index=False))
        raise CrawlError(f"run {run_id} would hold {len(duplicated)} state rows for {duplicated.drop_duplicates().shape[0]} "
                         f"(product_id, image_url) pairs seen twice, e.g. {sample}; outputs are not committed. "
                         "This is a bug: report it with the manifest")


def _key_frame(frame: pd.DataFrame) -> pd.Series:
    return pd.Series(list(zip(frame["product_id"].astype(str).str.strip(), frame["image_url"].astype(str).str.strip())),
                     index=frame.index, dtype=object)


def _write_driver_rows(storage: Storage, run_id: str, rejected: pd.DataFrame, manifest: pd.DataFrame,
                       in_scope: pd.DataFrame, prev_state: pd.DataFrame, categories: list[str] | None,
                       summary: CrawlSummary) -> None:
    """Rows decided on the driver: manifest rows quarantined before fetching, images gone from
    the manifest (removed), and images of categories outside this run's scope (carried).

    Scope is decided by the manifest's category, not the previous run's: a (product, image) the
    manifest lists in a category of this run is crawled (even if it was elsewhere before); one it lists
    in another category is carried with that category (even if it was in a backfilled one before)."""
    now = _now()
    quarantine = [{"run_id": run_id, "stage": "crawl", "reason": r.reason, "detail": r.detail,
                   "row_index": int(r.row_index), "product_id": _text(r.product_id), "category": _text(r.category),
                   "image_url": _text(r.image_url), "at": now} for r in rejected.itertuples()]
    storage.write_table(f"{layout.quarantine_prefix(run_id, 'crawl')}part-driver.parquet", _table(quarantine, QUARANTINE))
    summary.quarantined += len(quarantine)
    summary.quarantine_reasons = dict(Counter(r["reason"] for r in quarantine))

    manifest_category = dict(zip(_key_frame(manifest), manifest["category"].astype(str).str.strip()))
    crawled = set(_key_frame(in_scope))
    prev_keys = _key_frame(prev_state) if len(prev_state) else pd.Series([], dtype=object)
    listed_now = prev_keys.map(lambda key: manifest_category.get(key))
    in_this_run = prev_keys.isin(crawled)
    if not categories:
        gone = prev_state[~in_this_run & listed_now.isna()]
        carried = prev_state.iloc[0:0]
    else:
        # Gone from the manifest: removed if its category is backfilled, or if its product now lives (by the
        # manifest) in a backfilled category: that product's rows are all this run's to decide.
        in_scope_products = set(in_scope["product_id"].astype(str).str.strip())
        backfilled = prev_state["category"].isin(categories) | prev_state["product_id"].isin(in_scope_products)
        gone = prev_state[~in_this_run & listed_now.isna() & backfilled]
        carried = prev_state[~in_this_run & ~(listed_now.isna() & backfilled)].copy()
        moved_out = listed_now[carried.index].notna() & (listed_now[carried.index] != carried["category"])
        carried.loc[moved_out, "category"] = listed_now[carried.index][moved_out]
    moved_in = prev_state[in_this_run].assign(now=prev_keys[in_this_run].map(manifest_category))
    moved_in = moved_in[moved_in["now"] != moved_in["category"]]
    summary.moved = len(moved_in) + (int(moved_out.sum()) if categories else 0)
    if categories:
        left = (set(moved_in["category"]) | set(prev_state.loc[moved_out[moved_out].index, "category"])
                | set(gone["category"]))
        joined = set(carried.loc[moved_out[moved_out].index, "category"])
        summary.index_scope = sorted(set(categories) | left | joined)
    removed = gone.assign(status="removed", checked_at=now, run_id=run_id)
    carried = carried.assign(status="carried", run_id=run_id)
    storage.write_table(f"{layout.crawl_state_prefix(run_id)}part-removed.parquet",
                        pa.Table.from_pandas(removed, schema=IMAGE_STATE, preserve_index=False))
    storage.write_table(f"{layout.crawl_state_prefix(run_id)}part-carried.parquet",
                        pa.Table.from_pandas(carried, schema=IMAGE_STATE, preserve_index=False))
    summary.removed, summary.carried = len(removed), len(carried)


def _text(value) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA else str(value)
