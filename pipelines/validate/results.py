"""What a validation produced: `StageValidation` (its fields are the JSON of
`reports/<run_id>/validation/<stage>.json`), the per-expectation report entries, the failed
critical expectations the checks gate reads, the warnings, and the previous successful run
(found from earlier runs' reports).

Bookkeeping over results already computed: this module never runs Spark or Great
Expectations and never writes to the warehouse (pipelines.validate.engine writes the report).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import layout
from pipelines.readers import committed_crawl_runs
from pipelines.storage import Storage
from pipelines.validate.failing_rows import FailingRows
from pipelines.validate.gates import GateResult
from pipelines.validate.suites import CRITICAL, ExpectationOutcome
from pipelines.validate.tables import _read_json


@dataclass
class StageValidation:
    """Everything one validation produced; written as reports/<run_id>/validation/<stage>.json."""

    run_id: str
    stage: str
    suite: str
    outcome: str                                   # passed | forced | stopped
    forced: bool
    gates: list[GateResult]
    expectations: list[dict[str, Any]]
    warnings: list[str]
    accounting: dict[str, Any]
    parameters: dict[str, Any]
    previous_successful_run: str | None
    quarantine_key: str | None
    report_key: str
    data_docs: str | None
    started_at: str
    elapsed_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)   # seconds per step (failing rows, GX, Data Docs)

    @property
    def tripped(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gates"] = [g.to_dict() for g in self.gates]
        data["tripped"] = [g.name for g in self.tripped]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)


def _expectation_report(outcomes: list[ExpectationOutcome], failing: FailingRows | None) -> list[dict[str, Any]]:
    report = []
    for outcome in outcomes:
        entry = outcome.to_dict()
        if failing is not None and outcome.name in failing.failures_per_expectation:
            entry["rows_failing_in_spark"] = failing.failures_per_expectation[outcome.name]
            entry["quarantined_with_this_reason"] = int(pc.sum(pc.equal(failing.rows.column("reason"),
                                                                       outcome.name)).as_py() or 0)
        report.append(entry)
    return report


def _batch_failures(outcomes: list[ExpectationOutcome], include_row_level: bool) -> list[dict[str, Any]]:
    """Critical expectations whose failure rows cannot absorb: they go to the stage's checks gate."""
    return [{"expectation": o.name, "observed": o.observed, "kwargs": o.kwargs}
            for o in outcomes if not o.success and o.severity == CRITICAL and (include_row_level or not o.row_level)]


def _warnings(outcomes: list[ExpectationOutcome], explained: set[str]) -> list[str]:
    """Failed warning/info expectations, except those a stage already explained in its own words."""
    return [f"{o.name} (severity {o.severity}) failed: observed {o.observed}"
            for o in outcomes if not o.success and o.severity != CRITICAL and o.name not in explained]


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    if len(column) == 0:
        return {}
    return {item["values"]: item["counts"] for item in pc.value_counts(column).to_pylist()}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def previous_successful_run(storage: Storage, run_id: str) -> str | None:
    """Latest run before `run_id` with a committed crawl that no validation stopped
    (a forced run counts as successful: someone decided to publish it)."""
    for candidate in sorted((r for r in committed_crawl_runs(storage) if r < run_id), reverse=True):
        reports = [k for k in storage.list(f"{layout.reports_prefix(candidate)}validation/") if k.endswith(".json")]
        if not any((_read_json(storage, k) or {}).get("outcome") == "stopped" for k in reports):
            return candidate
    return None
