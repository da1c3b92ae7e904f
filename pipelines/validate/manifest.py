"""Validating the manifest as read for a run (`runs/<run_id>/manifest.parquet`): blank fields
read as null; known categories are those of the previous successful run (new ones are
flagged, not rejected); quarantined rows the crawl had quarantined too are counted.

This module never edits the manifest and never writes anything but through
pipelines.validate.engine (`_finish`).
"""
from __future__ import annotations

import time

import pyarrow.compute as pc

from pipelines import layout
from pipelines.config import Settings, ValidateSettings
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
from pipelines.validate.gates import expectations_gate, quarantine_rate_gate
from pipelines.validate.results import (
    StageValidation,
    _batch_failures,
    _now_iso,
    previous_successful_run,
)
from pipelines.validate.tables import (
    ValidationInputError,
    _parquet_column_names,
    _rows_per_value,
    read_spark_table,
)
from schemas.tables import MANIFEST, QUARANTINE


@_with_query_settings
def validate_manifest(settings: Settings, run_id: str, *, spark, validation: ValidateSettings | None = None,
                      force: bool = False) -> StageValidation:
    """The manifest as read for the run: required fields, uniqueness, URL form, known categories."""
    from pyspark.sql import functions as F

    started, started_at = time.monotonic(), _now_iso()
    validation = _validation_settings(settings, validation)
    storage = open_storage(settings.warehouse, settings.s3)
    if not storage.exists(layout.manifest_key(run_id)):
        raise ValidationInputError(f"no manifest for run {run_id} at {storage.uri_for(layout.manifest_key(run_id))}: "
                                   f"run `catalog-index crawl --run-id {run_id}` first")
    previous = previous_successful_run(storage, run_id)
    manifest_key = layout.manifest_key(run_id)
    has_category = "category" in _parquet_column_names(storage, manifest_key)
    # Rows per category (blank read as null, as in the frame), counted from the Parquet column.
    # Known categories: the previous successful run's; on a first run, this manifest's own
    # (nothing to compare with).
    per_category = _manifest_categories(storage, manifest_key) if has_category else {}
    if not has_category:
        known = []
    elif previous and storage.exists(layout.manifest_key(previous)):
        known = sorted(c for c in _manifest_categories(storage, layout.manifest_key(previous)) if c is not None)
    else:
        known = sorted(c for c in per_category if c is not None)  # first run: nothing to compare with
    parameters = {"known_categories": known}
    memo = _look_up(storage, run_id, "manifest", validation, lambda: _rows_digest(storage, manifest_key, "manifest"),
                    parameters)
    if memo.hit:
        run = _reused_run(storage, run_id, "manifest", memo)
    else:
        raw = read_spark_table(spark, storage, manifest_key, MANIFEST, allow_arrow_fallback=validation.arrow_fallback_for_s3)
        blank_is_null = {c: F.when(F.trim(F.col(c)) != "", F.trim(F.col(c)))
                         for c in ("product_id", "category", "image_url") if c in raw.columns}
        df, cached = _cached_if_worth_it(_columns_to_validate(raw.withColumns(blank_is_null), "manifest"), storage,
                                         [manifest_key], validation)
        try:
            run = _run(spark, df, storage, run_id, "manifest", parameters, validation, quarantine_rows=True,
                       input_rows=sum(per_category.values()) if has_category else None)
        finally:
            if cached:
                df.unpersist()
        run.memo_key = memo.key
    new_categories = {c: n for c, n in sorted(per_category.items(), key=lambda kv: str(kv[0]))
                      if c is not None and c not in known}
    warnings = []
    if new_categories:
        listed = ", ".join(f"{c} ({n:,} rows)" for c, n in new_categories.items())
        warnings.append(f"{len(new_categories)} new categor{'y' if len(new_categories) == 1 else 'ies'} not in run "
                        f"{previous}: {listed}. Flagged, not rejected; check the feed if unexpected.")
    failing = run.failing
    gates = [expectations_gate("manifest", _batch_failures(run.outcomes, include_row_level=False)),
             quarantine_rate_gate("manifest", failing.quarantined, failing.input_rows, validation)]
    extra = {"new_categories": new_categories, "rows_per_category": {str(k): v for k, v in per_category.items()},
             "also_quarantined_by_crawl": _overlap_with_crawl(storage, run_id, failing)}
    result = _new_result(storage, run_id, "manifest", parameters, run, gates, previous, started, started_at, force,
                         extra, warnings, explained={"expect_column_values_to_be_in_set:category"})
    return _finish(storage, result, failing, force)


def _manifest_categories(storage: Storage, manifest_key: str) -> dict[str | None, int]:
    """Rows per category of a manifest file, trimmed, blank as None (as validation reads it)."""
    counts: dict[str | None, int] = {}
    for category, n in _rows_per_value(storage, manifest_key, "category").items():
        name = str(category).strip() if category is not None else None
        counts[name or None] = counts.get(name or None, 0) + n
    return counts


def _overlap_with_crawl(storage: Storage, run_id: str, failing: FailingRows) -> int:
    """Manifest rows quarantined here that the crawl had already quarantined (same row_index):
    the run report counts them once."""
    if failing.quarantined == 0 or "row_index" not in failing.rows.column_names:
        return 0
    crawl = storage.read_table(layout.quarantine_prefix(run_id, "crawl"), columns=["row_index"], schema=QUARANTINE)
    return int(pc.sum(pc.is_in(failing.rows.column("row_index"), crawl.column("row_index"))).as_py() or 0)
