"""Validate stage: Great Expectations suites on Spark, row quarantine and batch gates between a
stage and publish.

`validate_stage(settings, run_id, stage, spark=...)` runs one stage's suite
(`schemas/gx/<stage>.json`) with Great Expectations on a Spark DataFrame, then:

- rows failing a critical row-level expectation are written to
  `quarantine/<run_id>/validate/<stage>.parquet` (QUARANTINE schema; reason = the
  expectation's name, e.g. `expect_column_values_to_be_between:width`). That file is the
  stage's output: **downstream stages exclude its keys** (`exclude_quarantined`). No copy of
  the passing rows is written, because the embeddings table is a cross-run cache that a
  run must not rewrite, and because an exclusion list costs nothing when all rows pass.
  Accounting: every input row passes or has exactly one quarantine record (input rows =
  passed + quarantined), and GX and the row filters must have seen the same rows
  (`engine._cross_check`, before anything is written).
- batch-level gates (`gates`) decide whether the run may be published. A tripped gate raises
  `GateFailed` after the report is written, unless `force=True`, which the report records
  (`outcome: forced`).
- `reports/<run_id>/validation/<stage>.json` holds every expectation result and gate;
  `reports/<run_id>/gx/<stage>/index.html` is the GX Data Docs site.

Inputs per stage (what is validated), one module each: `manifest`, `images`, `embeddings`,
`index`. Downstream stages: embed skips `quarantined_sha256s(storage, run_id, "images")`,
build-index skips those and `quarantined_sha256s(storage, run_id, "embeddings")`.

Modules: `stage` (entry points, concurrency), `engine` (the run every table shares: query
settings, memo, suite, failing rows, cross-check, report), `results` (StageValidation and the
report's parts), `tables` (reading tables, row keys, quarantined keys), `suites` (suite files,
GX, Data Docs), `failing_rows` (the suite's row-level expectations as one Spark query),
`gates` (batch-level verdicts).

Cost (`bench/validate`): a stage is a handful of Spark queries, most of their time fixed
cost. Only the columns the suite reads are read; a small local table is not cached (re-reading
it is cheaper than building the cache); GX runs first and the one failing-rows query only
when GX counted failing rows; rows per category come from the Parquet column with pyarrow
(checked against GX's row count); adaptive execution is off while validating
(`validation.adaptive_query_execution`). Seconds per step are in the report (`timings_s`).

Public: `validate_stage` / `validate_stages` (the entry points), `StageValidation` (a result),
`GateFailed`, `STAGES`. Great Expectations is imported on first use, never with the package.
The stage never edits the data it validates and never touches a published snapshot.
"""
from pipelines.validate.gates import GateFailed, GateResult
from pipelines.validate.results import StageValidation
from pipelines.validate.stage import STAGES, validate_stage, validate_stages
from pipelines.validate.tables import ValidationInputError

__all__ = ["GateFailed", "GateResult", "STAGES", "StageValidation", "ValidationInputError", "validate_stage",
           "validate_stages"]
