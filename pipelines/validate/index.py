"""Validating a run's index build: per-shard stats (shard, vector_count, recall_at_10) of the
run's newest `indexes/<name>/<snapshot>/_build.json`, against the vectors the index must hold
(from the dedup output and the quarantines). Shards are never quarantined: a failure trips
the gate.

This module never touches a snapshot's files (it reads `_build.json` only) and writes nothing
but through pipelines.validate.engine (`_finish`).
"""
from __future__ import annotations

import time
from typing import Any

from pipelines import layout
from pipelines.config import Settings, ValidateSettings
from pipelines.fingerprint import digest
from pipelines.readers import quarantined_sha256s
from pipelines.snapshot import BUILD_FILE, BUILD_MAX_BYTES
from pipelines.storage import Storage, open_storage
from pipelines.validate.embeddings import (
    _canonical_digest,
    _excluded_before_embedding,
    _without,
)
from pipelines.validate.engine import (
    _finish,
    _look_up,
    _Memo,
    _new_result,
    _reused_run,
    _run,
    _validation_settings,
    _with_query_settings,
)
from pipelines.validate.gates import expectations_gate
from pipelines.validate.results import (
    StageValidation,
    _batch_failures,
    _now_iso,
    previous_successful_run,
)
from pipelines.validate.tables import ValidationInputError, _read_json, read_spark_table


def _find_build(storage: Storage, run_id: str) -> tuple[str, dict[str, Any]]:
    """The newest index build of this run: (warehouse key, its _build.json)."""
    builds = []
    for name in storage.list_dirs(layout.INDEXES_ROOT):
        for snapshot in storage.list_dirs(layout.index_prefix(name)):
            key = f"{layout.snapshot_prefix(name, snapshot)}{BUILD_FILE}"
            build = _read_json(storage, key, BUILD_MAX_BYTES)
            if build and build.get("source_run_id") == run_id:
                builds.append((build.get("created_at", ""), key, build))
    if not builds:
        raise ValidationInputError(f"no index build of run {run_id} under {storage.uri_for(layout.INDEXES_ROOT)} "
                                   f"(indexes/<name>/<snapshot>/{BUILD_FILE}): run build-index first, or "
                                   f"give the shard stats (--index-stats)")
    _, key, build = max(builds, key=lambda b: (b[0], b[1]))
    return key, build


def shard_rows(shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-shard stats as the index suite reads them, from a build's `shards` (shard_id, vectors,
    recall_at_10) or from plain {shard, vector_count, recall_at_10} dicts."""
    rows = []
    for s in shards:
        shard = s.get("shard", s.get("shard_id"))
        recall = s.get("recall_at_10")
        rows.append({"shard": None if shard is None else str(shard),
                     "vector_count": s.get("vector_count", s.get("vectors")),
                     "recall_at_10": None if recall is None else float(recall)})
    return rows


def _expected_vectors(spark, storage: Storage, run_id: str, validation: ValidateSettings,
                      shards: list[dict[str, Any]]) -> int:
    """Vectors the index must hold, from the dedup output: one per canonical image and group of
    categories sharing shards (the build packs whole categories into shards and stores an image
    once per shard; a category too big for one shard is split, each image in one part), for
    canonical images that were embedded and passed embeddings validation. When the shard stats
    do not list their categories, one vector per (category, canonical image)."""
    from pyspark.sql import functions as F

    if not storage.exists(layout.dedup_images_key(run_id)):
        report = _read_json(storage, layout.validation_report_key(run_id, "embeddings"))
        if report is None:
            raise ValidationInputError(f"cannot tell how many vectors the index of run {run_id} must hold: no "
                                       f"{storage.uri_for(layout.dedup_images_key(run_id))} and no embeddings validation "
                                       f"report; give --expected-vectors")
        return int(report["accounting"]["passed_rows"])
    dedup = read_spark_table(spark, storage, layout.dedup_images_key(run_id),
                             allow_arrow_fallback=validation.arrow_fallback_for_s3)
    pairs = dedup.select("category", dedup["canonical_sha256"].alias("sha256")).distinct()
    excluded = _excluded_before_embedding(storage, run_id) | quarantined_sha256s(storage, run_id, "embeddings")
    pairs = _without(spark, pairs, excluded)
    if not shards or not all(s.get("categories") for s in shards):
        return pairs.count()
    groups = sorted({tuple(sorted(s["categories"])) for s in shards})
    group_of = spark.createDataFrame([(c, "+".join(g)) for g in groups for c in g], "category string, shard_group string")
    # A category no shard holds keeps a group of its own: its images still count (and the sum fails).
    grouped = pairs.join(group_of, "category", "left").withColumn(
        "shard_group", F.coalesce("shard_group", F.concat(F.lit("unindexed:"), F.col("category"))))
    return grouped.select("shard_group", "sha256").distinct().count()


@_with_query_settings
def validate_index(settings: Settings, run_id: str, *, spark, shard_stats=None, expected_vectors: int | None = None,
                   validation: ValidateSettings | None = None, force: bool = False) -> StageValidation:
    """A built index: vector count equals the canonical images it must hold, every shard's
    recall@10 measured and above the threshold. Shards cannot be quarantined: every failure
    trips the gate.

    `shard_stats`: a list of dicts (see `shard_rows`) or a Spark DataFrame (shard, vector_count,
    recall_at_10); by default the shards of the run's newest `_build.json` under indexes/.
    `expected_vectors`: by default computed from the dedup output and the quarantines.
    """
    started, started_at = time.monotonic(), _now_iso()
    validation = _validation_settings(settings, validation)
    storage = open_storage(settings.warehouse, settings.s3)
    extra = {}
    memo = _Memo()
    if shard_stats is None:
        build_key, build = _find_build(storage, run_id)
        shard_stats, extra["build"] = build["shards"], build_key
        if expected_vectors is None:
            memo = _look_up(storage, run_id, "index", validation, lambda: (
                f"{digest(shard_rows(shard_stats), [s.get('categories') for s in shard_stats])}:"
                f"{_canonical_digest(storage, run_id, pairs=True)}"))
    if memo.hit:
        run = _reused_run(storage, run_id, "index", memo)
        parameters, shards = memo.source_report["parameters"], int(memo.source_report["accounting"]["input_rows"])
    else:
        if expected_vectors is None:
            expected_vectors = _expected_vectors(spark, storage, run_id, validation,
                                                 shard_stats if isinstance(shard_stats, list) else [])
        if isinstance(shard_stats, list):
            shard_stats = spark.createDataFrame([tuple(r.values()) for r in shard_rows(shard_stats)],
                                                "shard string, vector_count long, recall_at_10 double")
        df = shard_stats.cache()
        try:
            parameters = {"expected_vectors": int(expected_vectors), "min_recall_at_10": validation.min_recall_at_10}
            run = _run(spark, df, storage, run_id, "index", parameters, validation, quarantine_rows=False)
            shards = df.count()
        finally:
            df.unpersist()
        run.memo_key = memo.key
    gates = [expectations_gate("index", _batch_failures(run.outcomes, include_row_level=True))]
    result = _new_result(storage, run_id, "index", parameters, run, gates, previous_successful_run(storage, run_id),
                         started, started_at, force, extra)
    result.accounting = {"input_rows": shards, "passed_rows": shards, "quarantined_rows": 0, "quarantine_reasons": {}}
    return _finish(storage, result, None, force)
