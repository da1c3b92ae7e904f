"""The run every validated table shares, from a frame to a written report.

- query settings: Spark SQL settings for validation's queries, saved and restored once for
  the stages validated side by side (`_with_query_settings`);
- the memo: a fingerprint of suite, settings and inputs (pipelines.fingerprint); an earlier
  validation with the same fingerprint is reused instead of run again (`_look_up`, `_reused_run`);
- `_run`: the suite with GX (Data Docs into the warehouse), then the one failing-rows query,
  only when GX counted failing rows;
- `_new_result` (accounting, `_cross_check` of GX against the row filters) and `_finish`
  (quarantine, then report, then `GateFailed` if a gate tripped).

`run_suite` and `find_failing_rows` are looked up in this module at call time (tests replace
them here). This module never edits the data it validates, never writes a quarantine or a
report before `_cross_check` has passed, and knows no table's inputs (the table modules do).
"""
from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines import layout
from pipelines.config import Settings, ValidateSettings
from pipelines.fingerprint import memo_key, table_digest
from pipelines.spark import default_parallelism
from pipelines.storage import LocalStorage, Storage
from pipelines.validate.failing_rows import (
    FailingRows,
    find_failing_rows,
    no_failing_rows,
)
from pipelines.validate.gates import GateFailed, GateResult
from pipelines.validate.results import (
    StageValidation,
    _expectation_report,
    _value_counts,
    _warnings,
)
from pipelines.validate.suites import (
    ExpectationOutcome,
    columns_read,
    expectation_name,
    load_suite,
    read_suite,
    row_checks,
    run_suite,
    upload_folder,
)
from pipelines.validate.tables import (
    ROW_KEYS,
    _parquet_column_names,
    _parquet_keys,
    _read_json,
)
from schemas.tables import QUARANTINE

# Columns copied from a failing row into its quarantine record, when the frame has them.
_CARRIED = ["row_index", "product_id", "category", "image_url", "sha256", "http_status"]


_AQE = "spark.sql.adaptive.enabled"
_SHUFFLE_PARTITIONS = "spark.sql.shuffle.partitions"


@contextlib.contextmanager
def _query_settings(spark, validation: ValidateSettings):
    """Spark SQL settings for validation's queries, restored when the stage is done (the
    session belongs to the pipeline). Without adaptive execution
    (`validation.adaptive_query_execution`, off by default) nothing coalesces shuffle
    partitions, so the few shuffles validation has (group counts, uniqueness windows) use
    the session's default parallelism (its cores) instead of spark.sql.shuffle.partitions."""
    wanted = {_AQE: "true" if validation.adaptive_query_execution else "false"}
    if not validation.adaptive_query_execution:
        try:
            wanted[_SHUFFLE_PARTITIONS] = str(default_parallelism(spark))
        except Exception:  # a Spark Connect session has no SparkContext: keep its setting
            pass
    # Stages validated at the same time (validate_stages) share one setting and one restore:
    # the first to start saves the session's values, the last to finish puts them back.
    with _SETTINGS_LOCK:
        if _settings_users[0] == 0:
            _saved_settings.clear()
            _saved_settings.update({key: spark.conf.get(key, None) for key in wanted})
            for key, value in wanted.items():
                spark.conf.set(key, value)
        _settings_users[0] += 1
    try:
        yield
    finally:
        with _SETTINGS_LOCK:
            _settings_users[0] -= 1
            if _settings_users[0] == 0:
                for key, value in _saved_settings.items():
                    if value is None:
                        spark.conf.unset(key)
                    else:
                        spark.conf.set(key, value)


_SETTINGS_LOCK = threading.Lock()
_settings_users = [0]
_saved_settings: dict[str, str | None] = {}


def _with_query_settings(validate_fn):
    """Run a stage's validation under `_query_settings`."""
    @functools.wraps(validate_fn)
    def wrapper(settings: Settings, run_id: str, *, spark, validation: ValidateSettings | None = None, **kwargs):
        with _query_settings(spark, _validation_settings(settings, validation)):
            return validate_fn(settings, run_id, spark=spark, validation=validation, **kwargs)
    return wrapper


def _validation_settings(settings: Settings, validation: ValidateSettings | None) -> ValidateSettings:
    return validation or getattr(settings, "validation", None) or ValidateSettings()


def _columns_to_validate(df, stage: str):
    """`df` with only the columns that validating `stage` reads (those its suite names, the
    row key, the columns copied into quarantine records): Parquet reads, and a cache, hold
    nothing else. The whole frame when the suite looks at every column."""
    wanted = _validated_columns(stage)
    if wanted is None:
        return df
    return df.select(*[c for c in df.columns if c in wanted])


def _validated_columns(stage: str) -> set[str] | None:
    """Columns validating `stage` reads (its suite's, the row key, those copied into quarantine
    records); None when the suite looks at every column."""
    wanted = columns_read(read_suite(stage))
    return None if wanted is None else set(wanted) | set(ROW_KEYS[stage]) | set(_CARRIED)


def _rows_digest(storage: Storage, key_or_prefix: str, stage: str,
                 where: tuple[str, tuple[str, ...]] | None = None, ignore: tuple[str, ...] = ()) -> str:
    """Fingerprint of the rows validating `stage` reads from a table (see pipelines.fingerprint),
    less `ignore` (columns only copied into quarantine records, refreshed on reuse)."""
    columns = _validated_columns(stage)
    if columns is None:
        columns = set(_parquet_column_names(storage, key_or_prefix))
    return table_digest(storage, key_or_prefix, sorted(set(columns) - set(ignore)), sort_by=ROW_KEYS[stage],
                        where=where)


@dataclass
class _SuiteRun:
    outcomes: list[ExpectationOutcome]
    failing: FailingRows | None
    timings: dict[str, float] = field(default_factory=dict)
    memo_key: str | None = None       # fingerprint of suite, settings and inputs (pipelines.fingerprint)
    reused_from: str | None = None    # the run whose validation of the same inputs was reused


@dataclass
class _Memo:
    key: str | None = None
    source_run: str | None = None
    source_report: dict[str, Any] | None = None

    @property
    def hit(self) -> bool:
        return self.source_report is not None


def _look_up(storage: Storage, run_id: str, stage: str, validation: ValidateSettings, data_digest,
             extra: Any = None) -> _Memo:
    """The memo key of this stage's inputs, and the earlier validation with the same key (this
    run's own, on a rerun, or one of the five latest runs before it) if `validation.reuse_unchanged`.
    `data_digest` is a callable computing the inputs' fingerprint; None, or one that fails,
    means no key and no reuse."""
    if data_digest is None:
        return _Memo()
    try:
        settings = validation.model_dump(mode="json", exclude={"reuse_unchanged"})
        key = memo_key(stage, read_suite(stage), settings, data_digest(), extra)
    except Exception:  # noqa: BLE001 - an input that cannot be fingerprinted is validated normally
        return _Memo()
    if not validation.reuse_unchanged:
        return _Memo(key)   # recorded, so that a later run may reuse this one
    earlier = sorted((r for r in storage.list_dirs(layout.REPORTS_ROOT) if r < run_id), reverse=True)[:5]
    for candidate in [run_id, *earlier]:
        report = _read_json(storage, layout.validation_report_key(candidate, stage))
        if not report or (report.get("extra") or {}).get("memo_key") != key:
            continue
        if report.get("quarantine_key") and not storage.exists(report["quarantine_key"]):
            continue
        return _Memo(key, candidate, report)
    return _Memo(key)


def _reused_run(storage: Storage, run_id: str, stage: str, memo: _Memo) -> _SuiteRun:
    """The suite results and failing rows of `memo.source_run`'s validation, its Data Docs copied
    into this run's reports (GX and the row filters do not run)."""
    started = time.perf_counter()
    report, source = memo.source_report, memo.source_run
    outcomes = [ExpectationOutcome(name=e["expectation"], type=e["type"], kwargs=e["kwargs"], severity=e["severity"],
                                   row_level=e["row_level"], success=e["success"], result=e["result"],
                                   exception=e.get("exception")) for e in report["expectations"]]
    failing = None
    if report.get("quarantine_key"):
        table = storage.read_table(report["quarantine_key"], schema=QUARANTINE)
        keep = [c for c in _CARRIED if c in table.column_names] + ["reason", "detail"]
        failing = FailingRows(rows=table.select(keep), input_rows=int(report["accounting"]["input_rows"]),
                              failures_per_expectation={e["expectation"]: e["rows_failing_in_spark"]
                                                        for e in report["expectations"] if "rows_failing_in_spark" in e})
    if source != run_id:
        target, origin = layout.validation_docs_prefix(run_id, stage), layout.validation_docs_prefix(source, stage)
        storage.delete_prefix(target)
        for key in storage.list(origin):
            storage.write_bytes(target + key[len(origin):], storage.read_bytes(key))
    return _SuiteRun(outcomes, failing, {"reuse": round(time.perf_counter() - started, 3)},
                     memo_key=memo.key, reused_from=source)


def _run(spark, df, storage: Storage, run_id: str, stage: str, parameters: dict[str, Any],
         validation: ValidateSettings, quarantine_rows: bool, input_rows: int | None = None) -> _SuiteRun:
    """GX on the frame, Data Docs into the warehouse, then the failing rows found in Spark:
    one query for all critical row-level expectations, run only when GX counted failing rows
    for one of them (on a good night there is nothing to look for)."""
    suite = load_suite(stage)
    timings: dict[str, float] = {}
    prefix = layout.validation_docs_prefix(run_id, stage)
    storage.delete_prefix(prefix)  # a rerun replaces its own docs, and only those
    if isinstance(storage, LocalStorage):
        docs_dir, staging = storage.root / prefix, None
    else:
        staging = Path(tempfile.mkdtemp(prefix="catalog-index-gx-"))
        docs_dir = staging
    try:
        outcomes = run_suite(df, suite, parameters, run_name=run_id, docs_dir=docs_dir,
                             asset_name=stage, result_format=validation.result_format,
                             sample_failing_values=validation.sample_failing_values, timings=timings)
        if staging is not None:
            upload_folder(staging, storage, prefix)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    failing = None
    if quarantine_rows:
        started = time.perf_counter()
        checks = row_checks(suite, parameters, df.columns)
        if _gx_counted_failures(outcomes, {c.name for c in checks}):
            failing = find_failing_rows(df, checks, _CARRIED, input_rows)
        else:
            failing = no_failing_rows(checks, [c for c in _CARRIED if c in df.columns],
                                      df.count() if input_rows is None else input_rows)
        timings["failing_rows"] = round(time.perf_counter() - started, 3)
    return _SuiteRun(outcomes, failing, timings)


def _gx_counted_failures(outcomes: list[ExpectationOutcome], names: set[str]) -> bool:
    """Whether GX found (or may have found) a failing row for one of the expectations `names`:
    true unless each of them has an unexpected_count of 0 (none without counts, e.g. with
    result format BOOLEAN_ONLY, or after an exception)."""
    counts = {o.name: o.result.get("unexpected_count") for o in outcomes if o.name in names}
    return set(counts) != names or any(n != 0 for n in counts.values())


def _cached_if_worth_it(df, storage: Storage, inputs: list[str], validation: ValidateSettings):
    """(`df` or `df.cache()`, whether cached). Validation reads its frame 2 to 5 times (GX's
    aggregates and uniqueness counts, the failing rows). A table on local disk no larger than
    `validation.cache_above_mb` is re-read each time, columns pruned: that costs less than
    building Spark's columnar cache (0.2-0.4 s for the sample catalog's 8,000 rows). Remote
    or larger tables are cached."""
    if isinstance(storage, LocalStorage):
        size = sum((storage.root / k).stat().st_size for key in inputs for k in _parquet_keys(storage, key))
        if size <= validation.cache_above_mb * 2**20:
            return df, False
    return df.cache(), True


def _cross_check(stage: str, outcomes: list[ExpectationOutcome], failing: FailingRows) -> list[str]:
    """GX and the Spark row filters must have seen the same rows and, expectation by expectation,
    found the same failures; otherwise the quarantine would not match the suite. Different
    row counts stop validation; a different failure count is reported as a warning."""
    suite = {expectation_name(e): e for e in load_suite(stage)["expectations"]}
    notes = []
    for o in outcomes:
        seen = o.result.get("element_count")
        if seen is not None and seen != failing.input_rows:
            raise RuntimeError(f"validating {stage}: GX saw {seen} rows for {o.name}, the row filters "
                               f"{failing.input_rows}; nothing was written")
        gx_count, spark_count = o.result.get("unexpected_count"), failing.failures_per_expectation.get(o.name)
        keeps_first = bool((suite[o.name].get("meta") or {}).get("keep_first_by"))
        if gx_count is not None and spark_count is not None and gx_count != spark_count and not keeps_first:
            notes.append(f"{o.name}: GX counted {gx_count} failing rows, the Spark row filter {spark_count}; "
                         f"the quarantine follows the row filter (report this: the two should agree)")
    return notes


def _new_result(storage: Storage, run_id: str, stage: str, parameters: dict[str, Any], run: _SuiteRun,
                gates: list[GateResult], previous: str | None, started: float, started_at: str, force: bool,
                extra: dict[str, Any] | None = None, warnings: list[str] | None = None,
                explained: set[str] = frozenset()) -> StageValidation:
    failing = run.failing
    extra = dict(extra or {})
    if run.memo_key:
        extra["memo_key"] = run.memo_key
    if run.reused_from:
        extra["reused_validation_of"] = run.reused_from
    if failing is not None:
        if not run.reused_from:   # a reused result was cross-checked when it was made
            warnings = (warnings or []) + _cross_check(stage, run.outcomes, failing)
        # Every input row either failed a check (one quarantine record) or passed: input = passed + quarantined.
        accounting = {"input_rows": failing.input_rows, "passed_rows": failing.input_rows - failing.quarantined,
                      "quarantined_rows": failing.quarantined,
                      "quarantine_reasons": _value_counts(failing.rows.column("reason"))}
    else:
        accounting = {"input_rows": None, "passed_rows": None, "quarantined_rows": 0, "quarantine_reasons": {}}
    return StageValidation(
        run_id=run_id, stage=stage, suite=f"schemas/gx/{stage}.json", outcome="passed", forced=force, gates=gates,
        expectations=_expectation_report(run.outcomes, failing), warnings=(warnings or []) + _warnings(run.outcomes, explained),
        accounting=accounting, parameters=parameters, previous_successful_run=previous,
        quarantine_key=layout.validation_quarantine_key(run_id, stage) if failing is not None else None,
        report_key=layout.validation_report_key(run_id, stage),
        data_docs=f"{layout.validation_docs_prefix(run_id, stage)}index.html",
        started_at=started_at, elapsed_s=round(time.monotonic() - started, 3), extra=extra,
        timings_s=dict(run.timings))


def _finish(storage: Storage, result: StageValidation, failing: FailingRows | None, force: bool) -> StageValidation:
    """Write quarantine and report (last), then stop the run if a gate tripped."""
    if failing is not None:
        storage.write_table(layout.validation_quarantine_key(result.run_id, result.stage),
                            _quarantine_table(failing, result.run_id, result.stage))
    tripped = result.tripped
    result.outcome = "stopped" if tripped and not force else ("forced" if tripped else "passed")
    storage.write_text(result.report_key, result.to_json())
    if result.outcome == "stopped":
        raise GateFailed(result.stage, result.run_id, tripped, storage.uri_for(result.report_key), result)
    return result


def _quarantine_table(failing: FailingRows, run_id: str, stage: str) -> pa.Table:
    rows, n = failing.rows, failing.rows.num_rows
    now = pa.array([datetime.now(timezone.utc)] * n, QUARANTINE.field("at").type)
    columns = {"run_id": pa.array([run_id] * n, pa.string()), "stage": pa.array(["validate"] * n, pa.string()),
               "reason": rows.column("reason"), "detail": rows.column("detail"), "at": now}
    for f in QUARANTINE:
        if f.name not in columns:
            columns[f.name] = rows.column(f.name).cast(f.type) if f.name in rows.column_names else pa.nulls(n, f.type)
    return pa.table([columns[f.name] for f in QUARANTINE], schema=QUARANTINE)
