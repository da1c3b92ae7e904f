"""Validating a run's embeddings: the canonical images the run has to embed (dedup output less
what image validation and the embed stage quarantined) left-joined to
`embeddings/<model_version>/` (sha256, model_version, vector), with `dim`, `all_finite`, `norm`.

Also what the index validation needs to know about those images (`_excluded_before_embedding`,
`_canonical_digest`). This module never writes to the embeddings cache (a cross-run cache a
run must not rewrite) and writes nothing but through pipelines.validate.engine (`_finish`).
"""
from __future__ import annotations

import time

from pipelines import layout
from pipelines.config import Settings, ValidateSettings
from pipelines.fingerprint import values_digest
from pipelines.readers import quarantined_sha256s
from pipelines.storage import Storage, open_storage
from pipelines.validate.engine import (
    _columns_to_validate,
    _finish,
    _look_up,
    _Memo,
    _new_result,
    _reused_run,
    _run,
    _validation_settings,
    _with_query_settings,
)
from pipelines.validate.gates import expectations_gate, quarantine_rate_gate
from pipelines.validate.images import _live_images
from pipelines.validate.results import (
    StageValidation,
    _batch_failures,
    _now_iso,
    previous_successful_run,
)
from pipelines.validate.tables import (
    ValidationInputError,
    _read_json,
    _require_committed_crawl,
    read_spark_table,
)


def _embedding_frame(embeddings, canonical, model_version: str | None):
    """One row per canonical image, left-joined to its vectors, with derived dim/all_finite/norm."""
    from pyspark.sql import functions as F

    vectors = embeddings.where(F.col("model_version") == model_version) if model_version else embeddings
    images = canonical.select("sha256").where(F.col("sha256").isNotNull()).distinct()
    vector = F.col("vector")
    return (images.join(vectors.select("sha256", "model_version", "vector"), on="sha256", how="left")
            .withColumns({
                "dim": F.when(vector.isNotNull(), F.size(vector)),
                "all_finite": F.forall(vector, lambda x: ~F.isnan(x) & (F.abs(x) != F.lit(float("inf")))),
                "norm": F.sqrt(F.aggregate(vector, F.lit(0.0).cast("double"),
                                           lambda acc, x: acc + x.cast("double") * x.cast("double"))),
            }))


def _without(spark, df, shas: set[str]):
    """`df` without the rows whose sha256 is in `shas` (a small set, from quarantine files)."""
    if not shas:
        return df
    return df.join(spark.createDataFrame([(sha,) for sha in sorted(shas)], "sha256 string"), "sha256", "left_anti")


def _excluded_before_embedding(storage: Storage, run_id: str) -> set[str]:
    """Canonical images the run does not embed: quarantined by image validation or by the embed stage."""
    return quarantined_sha256s(storage, run_id, "images") | quarantined_sha256s(storage, run_id, "embed")


def _default_canonical(spark, storage: Storage, run_id: str, validation: ValidateSettings):
    """Canonical images the run has to embed: the dedup stage's canonical images (or, without a
    dedup output, every live image that passed validation), less what validation and the embed
    stage quarantined."""
    if storage.exists(layout.dedup_images_key(run_id)):
        dedup = read_spark_table(spark, storage, layout.dedup_images_key(run_id),
                                 allow_arrow_fallback=validation.arrow_fallback_for_s3)
        canonical = dedup.select(dedup["canonical_sha256"].alias("sha256")).distinct()
    else:
        _require_committed_crawl(storage, run_id)
        canonical = _live_images(spark, storage, run_id, validation).select("sha256").distinct()
    return _without(spark, canonical, _excluded_before_embedding(storage, run_id))


def _default_embeddings(spark, storage: Storage, run_id: str, model_version: str | None, validation: ValidateSettings):
    """The embeddings cache of the run's model version (from the embed stage's summary)."""
    model_version = _embedded_model_version(storage, run_id, model_version)
    return read_spark_table(spark, storage, layout.embeddings_prefix(model_version),
                            allow_arrow_fallback=validation.arrow_fallback_for_s3), model_version


def _embedded_model_version(storage: Storage, run_id: str, model_version: str | None) -> str:
    """The model version whose vectors the run's embeddings validation reads, checked to have some."""
    if model_version is None:
        summary = _read_json(storage, layout.embed_success_key(run_id))
        if summary is not None:
            model_version = summary["model_version"]
        else:
            versions = storage.list_dirs(layout.EMBEDDINGS_ROOT)
            if len(versions) != 1:
                raise ValidationInputError(
                    f"run {run_id} has no embed summary ({storage.uri_for(layout.embed_success_key(run_id))}) and "
                    f"{storage.uri_for(layout.EMBEDDINGS_ROOT)} holds {versions or 'no model versions'}: run the embed stage "
                    f"first or name the version (--model-version)")
            model_version = versions[0]
    if not any(k.endswith(".parquet") for k in storage.list(layout.embeddings_prefix(model_version))):
        raise ValidationInputError(f"no embeddings at {storage.uri_for(layout.embeddings_prefix(model_version))}: "
                                   f"run the embed stage first")
    return model_version


def _canonical_digest(storage: Storage, run_id: str, pairs: bool = False) -> str:
    """Fingerprint of the canonical images the run embeds (with `pairs`, of the (category,
    canonical image) pairs the index holds) and of what the quarantines took out of them."""
    import pyarrow.parquet as pq

    if not storage.exists(layout.dedup_images_key(run_id)):
        raise ValidationInputError("no dedup output to fingerprint")   # validated normally
    with storage.open_input(layout.dedup_images_key(run_id)) as source:
        dedup = pq.ParquetFile(source).read(columns=["category", "canonical_sha256"])
    if pairs:
        values = {f"{c}\t{s}" for c, s in zip(dedup.column("category").to_pylist(), dedup.column("canonical_sha256").to_pylist())}
        excluded = _excluded_before_embedding(storage, run_id) | quarantined_sha256s(storage, run_id, "embeddings")
    else:
        values = set(dedup.column("canonical_sha256").to_pylist())
        excluded = _excluded_before_embedding(storage, run_id)
    return f"{values_digest(values)}-{values_digest(excluded)}"


@_with_query_settings
def validate_embeddings(settings: Settings, run_id: str, *, spark, embeddings=None, canonical=None,
                        model_version: str | None = None, validation: ValidateSettings | None = None,
                        force: bool = False) -> StageValidation:
    """Vectors of the run's canonical images: one each, right dimension, finite, unit norm.

    `embeddings` (sha256, model_version, vector) and `canonical` (sha256: the images to embed)
    are Spark DataFrames; when not given they are read from the warehouse: the cache
    `embeddings/<model_version>/` of the version in `runs/<run_id>/embed/_SUCCESS.json`, and
    the canonical images of `dedup/<run_id>/images.parquet` less those quarantined by image
    validation or by the embed stage.
    """
    from pyspark.sql import functions as F

    started, started_at = time.monotonic(), _now_iso()
    validation = _validation_settings(settings, validation)
    storage = open_storage(settings.warehouse, settings.s3)
    memo = _Memo()
    if embeddings is None and canonical is None:
        model_version = _embedded_model_version(storage, run_id, model_version)
        memo = _look_up(storage, run_id, "embeddings", validation, lambda: (
            f"{model_version}:{values_digest(storage.list_versions(layout.embeddings_prefix(model_version)).items())}:"
            f"{_canonical_digest(storage, run_id)}"))
    if memo.hit:
        run = _reused_run(storage, run_id, "embeddings", memo)
        parameters = memo.source_report["parameters"]
        dims = {(None if k == "None" else int(k)): v
                for k, v in memo.source_report["extra"]["dimensions_seen"].items()}
    else:
        if embeddings is None:
            embeddings, model_version = _default_embeddings(spark, storage, run_id, model_version, validation)
        if canonical is None:
            canonical = _default_canonical(spark, storage, run_id, validation)
        df = _columns_to_validate(_embedding_frame(embeddings, canonical, model_version), "embeddings").cache()
        try:
            dims = {r["dim"]: r["count"] for r in df.groupBy("dim").count().collect()}
            canonical_images = df.select(F.countDistinct("sha256")).first()[0]
            embedding_dim = validation.embedding_dim or max(
                (d for d in dims if d is not None), key=lambda d: dims[d], default=0)
            parameters = {"canonical_images": canonical_images, "embedding_dim": embedding_dim,
                          "min_norm": 1 - validation.norm_tolerance, "max_norm": 1 + validation.norm_tolerance}
            run = _run(spark, df, storage, run_id, "embeddings", parameters, validation, quarantine_rows=True,
                       input_rows=sum(dims.values()))
        finally:
            df.unpersist()
        run.memo_key = memo.key
    failing = run.failing
    gates = [expectations_gate("embeddings", _batch_failures(run.outcomes, include_row_level=False)),
             quarantine_rate_gate("embeddings", failing.quarantined, failing.input_rows, validation)]
    extra = {"model_version": model_version, "dimensions_seen": {str(k): v for k, v in dims.items()}}
    result = _new_result(storage, run_id, "embeddings", parameters, run, gates, previous_successful_run(storage, run_id),
                         started, started_at, force, extra)
    return _finish(storage, result, failing, force)
