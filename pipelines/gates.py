"""Batch-level gates of the validate stage: thresholds, what each gate measures, and the verdict.

A gate looks at a whole run (a failure rate, a category's image count against the
previous successful run, a failed batch-level expectation) and decides whether the run
may go on to publish. Gates are plain functions over numbers, so each one is testable
without Spark; `pipelines.validate` feeds them the numbers.

This module must never import Spark or Great Expectations, nor `pipelines.config`
(`Settings` holds a `ValidateSettings`, so importing it back would be circular).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Crawl reason codes that mean "the bytes arrived but are not a decodable image".
DEFAULT_DECODE_FAILURE_REASONS = ["not_an_image", "empty_body", "truncated", "corrupt"]


class ValidateSettings(BaseModel):
    """Thresholds of the validate stage (`validation:` in the config file,
    `CATALOG_INDEX_VALIDATION__<FIELD>` in the environment)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt threshold must not silently keep its default

    # -- gates: a tripped gate stops the run before publish (unless --force) ------------------
    max_crawl_failure_rate: float = Field(
        0.10, ge=0, le=1, description="Largest share of in-scope manifest rows the crawl may quarantine.")
    max_decode_failure_rate: float = Field(
        0.02, ge=0, le=1, description="Largest share of downloaded bodies that may fail to decode as an image.")
    decode_failure_reasons: list[str] = Field(
        default_factory=lambda: list(DEFAULT_DECODE_FAILURE_REASONS),
        description="Crawl quarantine reasons counted as decode failures.")
    max_category_drop: float = Field(
        0.5, ge=0, le=1, description="Largest fall of a category's valid image count against the previous "
                                     "successful run (0.5 = it may lose half its images).")
    category_drop_min_previous: int = Field(
        20, ge=0, description="Categories with fewer images in the previous run are not checked "
                              "(small categories swing by chance).")
    max_quarantine_rate: dict[str, float] = Field(
        default_factory=lambda: {"manifest": 0.05, "images": 0.05, "embeddings": 0.0},
        description="Per stage: largest share of rows that row-level expectations may quarantine.")

    # -- expectation parameters (see schemas/gx/*.json) -----------------------------------------
    min_width: int = Field(32, ge=1, description="Images narrower than this are quarantined (pixels).")
    min_height: int = Field(32, ge=1, description="Images lower than this are quarantined (pixels).")
    min_aspect_ratio: float = Field(0.1, gt=0, description="Smallest width / height kept.")
    max_aspect_ratio: float = Field(10.0, gt=0, description="Largest width / height kept.")
    allowed_formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"],
        description="Image formats (from magic bytes) that may be embedded.")
    min_bytes: int = Field(100, ge=0, description="Smaller image files are quarantined.")
    max_bytes: int = Field(25_000_000, gt=0, description="Larger image files are quarantined.")
    embedding_dim: int | None = Field(
        None, ge=1, description="Expected vector dimension; unset = the most common one (all must agree).")
    norm_tolerance: float = Field(1e-3, gt=0, description="Vectors must have an L2 norm within 1 +- this.")
    min_recall_at_10: float = Field(0.9, ge=0, le=1, description="Smallest measured recall@10 of any index shard.")

    # -- how validation runs ----------------------------------------------------------------------
    result_format: Literal["BOOLEAN_ONLY", "BASIC", "SUMMARY"] = Field(
        "BASIC", description="GX result detail in reports and Data Docs: BASIC has counts and observed values; "
                             "SUMMARY adds, per row-level expectation, the query that selects its failing rows (one "
                             "more Spark query plan each); BOOLEAN_ONLY has pass/fail only, no counts, so failing rows "
                             "are always searched for.")
    sample_failing_values: int = Field(
        0, ge=0, le=200, description="Failing values GX lists per expectation in reports and Data Docs. Each "
                                     "costs a Spark job per row-level expectation, and every failing row is in "
                                     "the quarantine file anyway, with its values.")
    cache_above_mb: float = Field(
        64, ge=0, description="Cache the table being validated in Spark when its Parquet files are larger than this "
                              "(MB) or not on local disk (s3://). Smaller local tables are read again by each of "
                              "validation's few queries, which costs less than building Spark's columnar cache.")
    adaptive_query_execution: bool = Field(
        False, description="Spark adaptive query execution (spark.sql.adaptive.enabled) while a stage is validated; "
                           "the session's own settings are restored afterwards. Off by default: validation's queries "
                           "are global aggregates and a few window counts, which AQE cannot improve, and AQE runs "
                           "each of them as two Spark jobs with re-planning in between (measured: half of GX's JVM "
                           "time on the sample catalog). Off, shuffles use spark.default.parallelism partitions.")
    arrow_fallback_for_s3: bool = Field(
        False, description="For s3:// warehouses, read tables with boto3 on the driver and hand them to Spark "
                           "as Arrow instead of reading s3a:// paths (tests, small warehouses; no hadoop-aws).")
    reuse_unchanged: bool = Field(
        True, description="Reuse an earlier run's validation of a stage (suite results, quarantine, Data Docs) "
                          "when that stage's inputs, its suite and these settings are unchanged, instead of "
                          "running the suite again; the gates are still evaluated. Inputs are fingerprinted "
                          "with pyarrow (pipelines/validation_memo.py); the report names the run reused.")


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


class GateFailed(RuntimeError):
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
