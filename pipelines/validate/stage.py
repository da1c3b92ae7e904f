"""Entry points of the validate stage: `validate_stage` (one table of a run), `validate_stages`
(several; manifest and images side by side) and the registry of validated tables (`STAGES`).

This module only dispatches and runs stages concurrently: it never reads a table or runs a
suite itself (the table modules and pipelines.validate.engine do).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipelines import layout
from pipelines.config import Settings, ValidateSettings
from pipelines.validate.embeddings import validate_embeddings
from pipelines.validate.gates import GateFailed
from pipelines.validate.images import validate_images
from pipelines.validate.index import validate_index
from pipelines.validate.manifest import validate_manifest
from pipelines.validate.results import StageValidation
from pipelines.validate.tables import ValidationInputError

STAGES = ("manifest", "images", "embeddings", "index")
_VALIDATORS = {"manifest": validate_manifest, "images": validate_images, "embeddings": validate_embeddings,
               "index": validate_index}


# Stages whose validations read different inputs and write different outputs: validated at
# the same time by validate_stages (Spark runs their jobs side by side; GX's Python work and
# the driver's waits on the JVM overlap). Measured on the sample catalog: 2.5 s -> 2.0 s.
_CONCURRENT = {"manifest", "images"}


def validate_stages(settings: Settings, run_id: str, stages: list[str] | tuple[str, ...], *, spark,
                    force: bool = False, validation: ValidateSettings | None = None) -> dict[str, StageValidation]:
    """Validate several stages of a run; manifest and images side by side. Every stage is
    validated and reported even when one trips a gate; then the first GateFailed (in `stages`
    order) is raised."""
    if callable(spark):
        spark = spark()
    layout.check_run_id(run_id)
    for stage in stages:
        if stage not in _VALIDATORS:
            raise ValidationInputError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    together = [s for s in stages if s in _CONCURRENT]
    outcomes: dict[str, StageValidation | BaseException] = {}
    if len(together) > 1:
        with ThreadPoolExecutor(len(together), thread_name_prefix="validate") as pool:
            futures = {stage: pool.submit(validate_stage, settings, run_id, stage, spark=spark, force=force,
                                          validation=validation) for stage in together}
            for stage, future in futures.items():
                try:
                    outcomes[stage] = future.result()
                except GateFailed as exc:
                    outcomes[stage] = exc
    results: dict[str, StageValidation] = {}
    for stage in stages:
        if stage not in outcomes:
            outcomes[stage] = validate_stage(settings, run_id, stage, spark=spark, force=force, validation=validation)
        if isinstance(outcomes[stage], BaseException):
            raise outcomes[stage]
        results[stage] = outcomes[stage]
    return results


def validate_stage(settings: Settings, run_id: str, stage: str, *, spark, force: bool = False,
                   validation: ValidateSettings | None = None, **inputs: Any) -> StageValidation:
    """Validate one stage of a run; raises GateFailed when a gate trips (unless force).

    `spark` may be a SparkSession or a factory returning one (started only once the
    inputs have been found). `inputs` go to the stage's function (e.g. `model_version`).
    """
    layout.check_run_id(run_id)
    if stage not in _VALIDATORS:
        raise ValidationInputError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    if callable(spark):
        spark = spark()
    return _VALIDATORS[stage](settings, run_id, spark=spark, force=force, validation=validation, **inputs)
