"""Batch-level gates of the validate stage: thresholds, what each gate measures, and the verdict.

A gate looks at a whole run (a failure rate, a category's image count against the
previous successful run, a failed batch-level expectation) and decides whether the run
may go on to publish. Gates are plain functions over numbers, so each one is testable
without Spark; `pipelines.validate` feeds them the numbers.

This module must never import Spark or Great Expectations. Its thresholds are
`ValidateSettings` (pipelines.config, the `validation:` section).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipelines.config import ValidateSettings
from pipelines.errors import StageRefused


@dataclass
class GateResult:
    """One gate's verdict with the numbers behind it."""

    name: str
    passed: bool
    observed: Any
    threshold: Any
    setting: str                     # where the threshold is configured
    message: str                     # one line a data engineer can act on
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GateFailed(StageRefused):
    """A batch-level gate tripped: the run must not be published.

    `results` is the structured stage result (what `reports/<run_id>/validation/<stage>.json`
    holds); `tripped` the gates that stopped it.
    """

    def __init__(self, stage: str, run_id: str, tripped: list[GateResult], report_key: str, results: Any = None):
        self.stage, self.run_id, self.tripped, self.report_key, self.results = stage, run_id, tripped, report_key, results
        lines = [f"validation of {stage} for run {run_id} stopped the run: "
                 f"{len(tripped)} gate{'s' if len(tripped) != 1 else ''} tripped"]
        lines += [f"  - {gate.name}: {gate.message}" for gate in tripped]
        lines.append(f"Details: {report_key}. Fix the data and rerun, raise the threshold named above "
                     f"(config file or CATALOG_INDEX_VALIDATION__<FIELD>), or publish anyway with "
                     f"`catalog-index validate --run-id {run_id} --stage {stage} --force` "
                     f"(recorded in the report as forced).")
        super().__init__("\n".join(lines))


def _percent(value: float) -> str:
    return f"{value * 100:.1f}%"


def rate_gate(name: str, failed: int, total: int, max_rate: float, setting: str, what: str,
              details: dict[str, Any] | None = None) -> GateResult:
    """`failed / total <= max_rate`; an empty denominator passes (nothing could fail)."""
    rate = failed / total if total else 0.0
    passed = rate <= max_rate
    verdict = "within" if passed else "above"
    message = (f"{_percent(rate)} {what} ({failed:,} of {total:,}), {verdict} the limit of "
               f"{_percent(max_rate)} ({setting})")
    return GateResult(name, passed, round(rate, 6), max_rate, setting, message,
                      {"failed": failed, "total": total, **(details or {})})


def crawl_failure_gate(summary: dict[str, Any], settings: ValidateSettings) -> GateResult:
    """Share of in-scope manifest rows the crawl quarantined (from its _SUCCESS.json summary)."""
    in_scope = summary["manifest_rows"] - summary.get("out_of_scope", 0)
    return rate_gate("crawl_failure_rate", summary["quarantined"], in_scope, settings.max_crawl_failure_rate,
                     "validation.max_crawl_failure_rate", "of manifest rows were quarantined by the crawl",
                     {"quarantine_reasons": summary.get("quarantine_reasons", {})})


def decode_failure_gate(summary: dict[str, Any], settings: ValidateSettings) -> GateResult:
    """Share of bodies downloaded this run that were not decodable images.

    Denominator: bodies that arrived and were inspected (fetched + decode failures);
    304 revalidations downloaded nothing and are not counted.
    """
    reasons = summary.get("quarantine_reasons", {})
    counted = {r: reasons[r] for r in settings.decode_failure_reasons if reasons.get(r)}
    failed = sum(counted.values())
    return rate_gate("decode_failure_rate", failed, summary["fetched"] + failed, settings.max_decode_failure_rate,
                     "validation.max_decode_failure_rate", "of downloaded bodies did not decode as images",
                     {"reasons": counted})


def category_drop_gate(current: dict[str, int], previous: dict[str, int] | None, previous_run: str | None,
                       settings: ValidateSettings) -> GateResult:
    """Categories whose valid image count fell by more than `max_category_drop` since the
    previous successful run. A category gone entirely counts as a 100% drop."""
    setting = "validation.max_category_drop"
    if not previous:
        return GateResult("category_drop", True, {}, settings.max_category_drop, setting,
                          "no previous successful run to compare with", {"previous_run": previous_run})
    drops = {}
    for category, before in sorted(previous.items()):
        if before < max(settings.category_drop_min_previous, 1):
            continue
        after = current.get(category, 0)
        drop = (before - after) / before
        if drop > settings.max_category_drop:
            drops[category] = {"previous": before, "current": after, "drop": round(drop, 6)}
    checked = sum(1 for before in previous.values() if before >= max(settings.category_drop_min_previous, 1))
    if drops:
        worst = ", ".join(f"{c} {d['previous']:,} -> {d['current']:,} (-{_percent(d['drop'])})" for c, d in drops.items())
        message = (f"{len(drops)} categor{'y' if len(drops) == 1 else 'ies'} lost more than "
                   f"{_percent(settings.max_category_drop)} of their images since run {previous_run} ({setting}): {worst}")
    else:
        message = (f"no category lost more than {_percent(settings.max_category_drop)} of its images since run "
                   f"{previous_run} ({checked} categories with >= {settings.category_drop_min_previous} images checked)")
    return GateResult("category_drop", not drops, drops, settings.max_category_drop, setting, message,
                      {"previous_run": previous_run, "current": current, "previous": previous,
                       "min_previous": settings.category_drop_min_previous})


def expectations_gate(stage: str, failed: list[dict[str, Any]]) -> GateResult:
    """Critical expectations that cannot be fixed by dropping rows (batch-level ones, or every
    expectation of a stage whose rows cannot be quarantined, like index shards)."""
    if not failed:
        return GateResult(f"{stage}_checks", True, 0, 0, f"schemas/gx/{stage}.json",
                          f"every batch-level expectation of the {stage} suite holds")
    listed = "; ".join(f"{e['expectation']} observed {e.get('observed')!r}" for e in failed)
    return GateResult(f"{stage}_checks", False, len(failed), 0, f"schemas/gx/{stage}.json",
                      f"{len(failed)} expectation{'s' if len(failed) != 1 else ''} of the {stage} suite failed: {listed}",
                      {"failed": failed})


def quarantine_rate_gate(stage: str, quarantined: int, total: int, settings: ValidateSettings) -> GateResult:
    limit = settings.max_quarantine_rate.get(stage, 0.0)
    return rate_gate("quarantine_rate", quarantined, total, limit, f"validation.max_quarantine_rate.{stage}",
                     f"of {stage} rows failed a row-level expectation and were quarantined")
