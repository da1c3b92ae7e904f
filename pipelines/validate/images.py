"""Validating a run's images: the live rows of the committed crawl (`runs/<run_id>/crawl/state`),
with `aspect_ratio`; gates: crawl failure rate, decode failure rate, category drop against the
previous successful run, failed batch-level expectations, quarantine rate.

This module never edits the crawl state and never writes anything but through
pipelines.validate.engine (`_finish`).
"""
from __future__ import annotations

import time

import pyarrow as pa

from pipelines import layout
from pipelines.config import Settings, ValidateSettings
from pipelines.readers import LIVE_STATUSES
from pipelines.storage import Storage, open_storage
from pipelines.validate.engine import (
    _cached_if_worth_it,
    _columns_to_validate,
    _finish,
    _look_up,
    _new_result,
    _reused_run,
    _rows_digest,
    _run,
    _validation_settings,
    _with_query_settings,
)
from pipelines.validate.failing_rows import FailingRows
from pipelines.validate.gates import (
    category_drop_gate,
    crawl_failure_gate,
    decode_failure_gate,
    expectations_gate,
    quarantine_rate_gate,
)
from pipelines.validate.results import (
    StageValidation,
    _batch_failures,
    _now_iso,
    _value_counts,
    previous_successful_run,
)
from pipelines.validate.tables import (
    ROW_KEYS,
    _read_json,
    _require_committed_crawl,
    _rows_per_value,
    read_spark_table,
)
from schemas.tables import IMAGE_STATE


def _live_images(spark, storage: Storage, run_id: str, validation: ValidateSettings):
    from pyspark.sql import functions as F

    state = read_spark_table(spark, storage, layout.crawl_state_prefix(run_id), IMAGE_STATE,
                             allow_arrow_fallback=validation.arrow_fallback_for_s3)
    ratio = F.when(F.col("height") > 0, F.col("width").cast("double") / F.col("height").cast("double"))
    return state.where(F.col("status").isin(*LIVE_STATUSES)).withColumn("aspect_ratio", ratio)


def _valid_images_per_category(storage: Storage, run_id: str) -> dict[str, int]:
    """A past run's images per category that reached the index: from its images report when it
    was validated, else its live crawl rows."""
    report = _read_json(storage, layout.validation_report_key(run_id, "images"))
    if report and "valid_images_per_category" in report.get("extra", {}):
        return report["extra"]["valid_images_per_category"]
    return _rows_per_value(storage, layout.crawl_state_prefix(run_id), "category", where=("status", LIVE_STATUSES))


@_with_query_settings
def validate_images(settings: Settings, run_id: str, *, spark, validation: ValidateSettings | None = None,
                    force: bool = False) -> StageValidation:
    """The run's live images: dimensions, aspect ratio, format, size; crawl and category gates."""
    started, started_at = time.monotonic(), _now_iso()
    validation = _validation_settings(settings, validation)
    storage = open_storage(settings.warehouse, settings.s3)
    summary = _require_committed_crawl(storage, run_id)
    previous = previous_successful_run(storage, run_id)
    parameters = {"min_width": validation.min_width, "min_height": validation.min_height,
                  "min_aspect_ratio": validation.min_aspect_ratio, "max_aspect_ratio": validation.max_aspect_ratio,
                  "allowed_formats": list(validation.allowed_formats), "min_bytes": validation.min_bytes,
                  "max_bytes": validation.max_bytes}
    state_prefix = layout.crawl_state_prefix(run_id)
    live_per_category = _rows_per_value(storage, state_prefix, "category", where=("status", LIVE_STATUSES))
    memo = _look_up(storage, run_id, "images", validation, lambda: _rows_digest(
        storage, state_prefix, "images", where=("status", LIVE_STATUSES), ignore=("http_status",)))
    if memo.hit:
        run = _reused_run(storage, run_id, "images", memo)
        run.failing = _with_current_values(run.failing, storage, state_prefix, ROW_KEYS["images"], ["http_status"])
    else:
        df, cached = _cached_if_worth_it(_columns_to_validate(_live_images(spark, storage, run_id, validation),
                                                              "images"), storage, [state_prefix], validation)
        try:
            run = _run(spark, df, storage, run_id, "images", parameters, validation, quarantine_rows=True,
                       input_rows=sum(live_per_category.values()))
        finally:
            if cached:
                df.unpersist()
        run.memo_key = memo.key
    previous_counts = _valid_images_per_category(storage, previous) if previous else None
    failing = run.failing
    rejected = _value_counts(failing.rows.column("category")) if failing.quarantined else {}
    valid_per_category = {c: n - rejected.get(c, 0) for c, n in sorted(live_per_category.items())}
    gates = [crawl_failure_gate(summary, validation), decode_failure_gate(summary, validation),
             category_drop_gate(valid_per_category, previous_counts, previous, validation),
             expectations_gate("images", _batch_failures(run.outcomes, include_row_level=False)),
             quarantine_rate_gate("images", failing.quarantined, failing.input_rows, validation)]
    extra = {"valid_images_per_category": valid_per_category, "crawl_summary": {
        k: summary.get(k) for k in ("manifest_rows", "out_of_scope", "fetched", "not_modified", "stale", "quarantined",
                                    "quarantine_reasons")}}
    result = _new_result(storage, run_id, "images", parameters, run, gates, previous, started, started_at, force, extra)
    return _finish(storage, result, failing, force)


def _with_current_values(failing: FailingRows, storage: Storage, key_or_prefix: str, keys: list[str],
                         columns: list[str]) -> FailingRows:
    """A reused quarantine with `columns` taken from this run's table (matched on `keys`): a night
    whose images all came back 304 quarantines them with this night's HTTP status, not the
    earlier night's."""
    rows = failing.rows
    if rows.num_rows == 0 or not all(c in rows.column_names for c in keys + columns):
        return failing
    current = storage.read_table(key_or_prefix, columns=keys + columns).to_pandas().drop_duplicates(keys)
    merged = rows.drop_columns(columns).to_pandas().merge(current, on=keys, how="left")
    refreshed = pa.Table.from_pandas(merged[rows.column_names], schema=rows.schema, preserve_index=False)
    return FailingRows(refreshed, failing.failures_per_expectation, failing.input_rows)
