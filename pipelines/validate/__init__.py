"""Validate stage: Great Expectations suites on Spark, row quarantine and batch gates.

Public: `validate_stage` / `validate_stages` (the entry points), `StageValidation` (a result),
`GateFailed`, `STAGES`. Great Expectations is imported on first use, never with the package.
"""
from pipelines.validate.gates import GateFailed, GateResult
from pipelines.validate.stage import STAGES, StageValidation, ValidationInputError, validate_stage, validate_stages

__all__ = ["GateFailed", "GateResult", "STAGES", "StageValidation", "ValidationInputError", "validate_stage",
           "validate_stages"]
