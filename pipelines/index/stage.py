"""Build stage driver: turn one run's deduplicated images and their embeddings into sharded FAISS
indexes.

    dedup/<run_id>/images.parquet + embeddings/<model_version>/  ->  indexes/<name>/<snapshot_id>/
        shards/<shard_id>.faiss    one FAISS index per shard (inner product on L2-normalised vectors)
        idmaps/<shard_id>.parquet  vector id -> every product that shares the image (schemas.tables.INDEX_IDMAP)
        _build.json                what was built, with checksums and measured recall (publish reads it)

How the package is cut up (the driver here composes the rest):

* `plan`: `plan_shards` packs categories into shards of at most `max_vectors_per_shard` vectors;
  `choose_index_type` picks, per shard, the most exact index that fits the memory budget.
* `vectors`: a shard's vectors read in chunks (`VectorSource`), exact search and recall@k.
* `shard`: `build_shard` (a plain function: tests and the benchmark call it directly) builds one
  shard from any `VectorSource`, tunes nprobe/efSearch and measures recall@10 on held-out vectors.
* `routing`: the driver locates every vector from the embeddings cache's sha256 column alone
  (`locate_vectors`); `plan_vector_reads` decides which rows each shard task reads.
* `tasks`: the Spark task bodies (`run_shard_task`, `run_route_task`) and their payloads.
* `reuse`: shards of the live snapshot that a nightly build can copy instead of rebuilding.
* here, `build_index`: read the dedup run, plan, dispatch with `pipelines.spark.run_tasks`, write
  `_build.json`, quarantine rows without a vector, and raise `IndexCheckFailed` when a shard's
  recall is under `min_recall`, so nothing is published.

This package must never write `manifest.json` or `LATEST` (only `pipelines.publish` makes a build
visible to readers), never modify a published snapshot, and never hold a whole shard's vectors
in anonymous memory: they are staged in a local file and read back in chunks.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import layout
from pipelines.config import IndexSettings, Settings
from pipelines.dedup import with_valid_canonicals
from pipelines.index.errors import IndexBuildError, IndexCheckFailed
from pipelines.index.plan import _plan_members, plan_shards
from pipelines.index.reuse import _members_digest, _unchanged_shards
from pipelines.index.routing import locate_vectors, plan_vector_reads
from pipelines.index.tasks import (
    CopyTask,
    ShardTask,
    file_record,
    run_route_task,
    run_shard_task,
)
from pipelines.layout import (
    check_run_id,
    dedup_images_key,
    embeddings_prefix,
    missing_embedding_quarantine_key,
    snapshot_prefix,
)
from pipelines.readers import quarantined_sha256s
from pipelines.snapshot import (
    BUILD_FILE,
    METRIC,
    MODEL_PCA_PATH,
    read_latest,
    read_manifest,
)
from pipelines.spark import default_parallelism, run_tasks
from pipelines.storage import Storage, open_storage
from schemas.reasons import MISSING_EMBEDDING
from schemas.tables import QUARANTINE


def index_settings_from(settings: Settings) -> IndexSettings:
    """The `index:` section; defaults until Settings carries one."""
    section = getattr(settings, "index", None)
    if isinstance(section, IndexSettings):
        return section
    if hasattr(section, "model_dump"):  # the same fields declared in pipelines.config
        section = section.model_dump()
    return IndexSettings.model_validate(section or {})


def new_snapshot_id(now: datetime | None = None) -> str:
    """UTC time to the millisecond plus 4 random hex digits: ids sort in build order and never collide
    (`20261123T031512.048Z-3f9a`)."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


@dataclass
class BuildResult:
    snapshot_id: str
    index_name: str
    run_id: str
    status: str                 # passed | failed_recall_check
    shards: list[dict]
    vectors: int
    products: int
    missing_embeddings: int
    reused_shards: int
    seconds: float
    report: dict = field(repr=False, default_factory=dict)


def latest_dedup_run(storage: Storage) -> str:
    runs = [run for run in storage.list_dirs(layout.DEDUP_ROOT) if storage.exists(dedup_images_key(run))
            or storage.list(dedup_images_key(run) + "/")]
    if not runs:
        raise IndexBuildError(f"no dedup output under {storage.uri_for(layout.DEDUP_ROOT)}: run the dedup stage first "
                              "or pass --run-id")
    return sorted(runs)[-1]


def read_dedup_members(storage: Storage, run_id: str) -> pa.Table:
    """Distinct (category, canonical image, product) rows of a dedup run: what the id maps hold."""
    key = dedup_images_key(run_id)
    if storage.exists(key):
        table = storage.read_table(key)
    elif storage.list(key + "/"):
        table = storage.read_table(key + "/")  # written as a directory of parts
    else:
        raise IndexBuildError(f"{storage.uri_for(key)} does not exist: run dedup for run {run_id} first "
                              "(or pick another --run-id)")
    needed = ["product_id", "category", "image_url", "title", "canonical_sha256"]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise IndexBuildError(f"{storage.uri_for(key)} lacks column(s) {', '.join(missing)} "
                              f"(found: {', '.join(table.column_names)}); see schemas/tables.py DEDUP_IMAGES")
    # Images the validate stage quarantined (as images or as embeddings) are accounted for
    # there; they are not indexed and must not count as missing vectors here. A cluster whose
    # canonical image was rejected is represented by its best valid member, as the embed stage
    # chose it (pipelines.dedup.with_valid_canonicals).
    frame = table.to_pandas()
    rejected_images = quarantined_sha256s(storage, run_id, "images")
    if {"sha256", "cluster_id", "width", "height", "fetched_at"} <= set(frame.columns):
        frame = with_valid_canonicals(frame, rejected_images)
    else:  # a hand-made table without the canonical rule's inputs
        frame = frame[~frame["canonical_sha256"].isin(rejected_images)]
    frame = frame[needed].rename(columns={"canonical_sha256": "sha256"})
    frame = frame[~frame["sha256"].isin(quarantined_sha256s(storage, run_id, "embeddings"))]
    # One row per (category, image, product): a product with two copies of one picture is one hit.
    frame = frame.sort_values(["category", "sha256", "product_id", "image_url"])
    frame = frame.drop_duplicates(["category", "sha256", "product_id"]).reset_index(drop=True)
    return pa.Table.from_pandas(frame, preserve_index=False)


def build_index(settings: Settings, run_id: str | None = None, *, model: Any = None,
                categories: Sequence[str] | None = None, cfg: IndexSettings | None = None,
                runner: str = "spark", spark=None, snapshot_id: str | None = None) -> BuildResult:
    """Build every shard of a new snapshot directory for `run_id` (default: the newest dedup run).

    `model` is the embedding model: a `pipelines.model.ModelSpec`, or its `describe()` dict (at
    least `version`); default: the installed production model. `spark` is a SparkSession or a
    factory for one, called only once the inputs have been checked. With `categories` (a
    backfill), only the shards holding those categories are rebuilt; every other shard of the
    snapshot `LATEST` points to is copied byte for byte. Raises IndexCheckFailed (after writing
    `_build.json`) when any rebuilt shard's recall@10 is under `min_recall`.
    """
    started = time.perf_counter()
    cfg = cfg or index_settings_from(settings)
    storage = open_storage(settings.warehouse, settings.s3)
    run_id = check_run_id(run_id) if run_id else latest_dedup_run(storage)
    model_info, model_files = _describe_model(model)
    version = model_info["version"]
    emb_prefix = embeddings_prefix(version)
    if not any(k.endswith(".parquet") for k in storage.list(emb_prefix)):
        found = storage.list_dirs(layout.EMBEDDINGS_ROOT)
        raise IndexBuildError(f"no embeddings for model version {version} under {storage.uri_for(emb_prefix)} "
                              f"(versions present: {', '.join(found) or 'none'}): run the embed stage for this "
                              "model first, or pass --model-version to index another version's vectors")
    members = read_dedup_members(storage, run_id)
    start_pointer = read_latest(storage, cfg.name)  # the base publish moves LATEST from (compare-and-swap)
    snapshot_id = snapshot_id or new_snapshot_id()
    prefix = snapshot_prefix(cfg.name, snapshot_id)

    reused: list[dict] = []
    previous_id = None
    previous_dimension = None
    first_number = 0
    if categories:
        pointer = read_latest(storage, cfg.name)
        if pointer is None:
            raise IndexBuildError(f"a category backfill needs a published snapshot of index {cfg.name!r} to reuse; "
                                  "none is published yet: run a full build-index and publish first")
        previous_id = pointer["snapshot_id"]
        previous = read_manifest(storage, cfg.name, previous_id)
        if previous["model"]["version"] != version:
            raise IndexBuildError(f"snapshot {previous_id} was built with model {previous['model']['version']}, this "
                                  f"build uses {version}: shards of two models cannot be mixed, run a full build")
        previous_dimension = previous["dimension"]
        rebuild = set(categories)
        for shard in previous["shards"]:
            if rebuild.isdisjoint(shard["categories"]):
                reused.append(shard)
            else:
                rebuild.update(shard["categories"])  # a co-packed category is rebuilt with its shard
        first_number = 1 + max((int(s["shard_id"].rsplit("-", 1)[-1]) for s in previous["shards"]), default=-1)
        members = members.filter(pc.is_in(members.column("category"), value_set=pa.array(sorted(rebuild))))

    pairs = members.group_by(["category", "sha256"]).aggregate([])
    counts = pairs.group_by("category").aggregate([("sha256", "count")])
    category_vectors = dict(zip(counts.column("category").to_pylist(), counts.column("sha256_count").to_pylist()))
    plans = plan_shards(category_vectors, cfg.max_vectors_per_shard, first_number)
    if not plans and not reused:
        raise IndexBuildError(f"dedup run {run_id} has no images to index"
                              + (f" in categories {', '.join(sorted(categories))}" if categories else ""))
    plan_rows = {plan.shard_id: _plan_members(members, plan) for plan in plans}
    members_digests = {shard_id: _members_digest(rows) for shard_id, rows in plan_rows.items()}
    if not categories and cfg.reuse_unchanged_shards:
        unchanged = _unchanged_shards(storage, cfg, version, plans, members_digests)
        if unchanged is not None:
            previous_id, kept, previous_dimension = unchanged
            reused = [shard for _, shard in kept]
            kept_ids = {plan.shard_id for plan, _ in kept}
            plans = [plan for plan in plans if plan.shard_id not in kept_ids]
            # Rebuilt shards get ids the kept ones do not have (a kept shard keeps its id).
            taken = {shard["shard_id"] for shard in reused}
            number = 1 + max(int(s.rsplit("-", 1)[-1]) for s in taken) if taken else 0
            for plan in plans:
                if plan.shard_id in taken:
                    new_id = f"shard-{number:04d}"
                    number += 1
                    plan_rows[new_id], members_digests[new_id] = plan_rows.pop(plan.shard_id), members_digests.pop(plan.shard_id)
                    plan.shard_id = new_id

    staging = layout.build_staging_prefix(prefix)
    tasks: list[ShardTask | CopyTask] = []
    shard_shas: dict[str, pa.Array] = {}
    for plan in plans:
        rows = plan_rows[plan.shard_id]
        members_key = layout.staging_members_key(staging, plan.shard_id)
        storage.write_table(members_key, rows)
        shard_shas[plan.shard_id] = pc.unique(rows.column("sha256"))
        tasks.append(ShardTask(settings.warehouse, settings.s3, prefix, plan.shard_id, plan.categories,
                               members_key, [], cfg, threads=1))
    reads = None
    if plans:
        reads = plan_vector_reads(*locate_vectors(storage, emb_prefix), shard_shas, staging, settings.warehouse,
                                  settings.s3)
        for task in tasks:
            task.vector_files = reads.shard_files[task.shard_id]
    previous_prefix = snapshot_prefix(cfg.name, previous_id) if previous_id else ""
    tasks.extend(CopyTask(settings.warehouse, settings.s3, prefix, previous_prefix, shard) for shard in reused)
    for path, data in model_files.items():
        storage.write_bytes(prefix + path, data)

    session = (spark() if callable(spark) else spark) if runner == "spark" else None
    threads = _threads_per_task(session, sum(isinstance(t, ShardTask) for t in tasks))
    for task in tasks:
        if isinstance(task, ShardTask):
            task.threads = threads
    try:
        if reads is not None and reads.route_tasks:
            run_tasks_for_index(reads.route_tasks, runner, session, f"route vectors to {len(plans)} shards",
                                fn=run_route_task)
        results = run_tasks_for_index(tasks, runner, session, f"build {len(plans)} index shards"
                                      + (f", reuse {len(reused)}" if reused else ""))
    finally:
        storage.delete_prefix(staging)
    shards = sorted((r for r in results if r.get("vectors")), key=lambda s: s["shard_id"])
    missing = sorted({sha for r in results for sha in r.get("missing_embeddings", [])})
    for shard in shards:
        shard.pop("missing_embeddings", None)
        if "reused_from" not in shard and not missing:
            shard["members_sha256"] = members_digests.get(shard["shard_id"])
    if missing:
        _quarantine_missing(storage, run_id, members, missing)
    dimensions = {s["dimension"] for s in shards if "dimension" in s} | (
        {previous_dimension} if previous_dimension else set())
    if len(dimensions) != 1:
        raise IndexBuildError(f"shards of this build have dimensions {sorted(dimensions)}: the embeddings of one "
                              "model version must all have one length; re-embed with a single model")
    failing = [s for s in shards if "reused_from" not in s and s["recall_at_10"] < cfg.min_recall]
    status = "failed_recall_check" if failing else "passed"
    report = {
        "build_version": 1,
        "snapshot_id": snapshot_id,
        "index_name": cfg.name,
        "status": status,
        "source_run_id": run_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {**model_info, "dim": model_info.get("dim") or dimensions.copy().pop()},
        "model_files": [file_record(path, data=data) for path, data in sorted(model_files.items())],
        "dimension": dimensions.pop(),
        "metric": METRIC,
        "settings": cfg.model_dump(),
        "backfill": {"categories": sorted(categories), "base_snapshot": previous_id} if categories else None,
        "base_snapshot": previous_id or (start_pointer["snapshot_id"] if start_pointer else None),
        "missing_embeddings": len(missing),
        "vector_reads": reads.describe() if reads is not None else None,
        "shards": shards,
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_text(prefix + BUILD_FILE, json.dumps(report, indent=2, sort_keys=True))
    result = BuildResult(snapshot_id, cfg.name, run_id, status, shards, sum(s["vectors"] for s in shards),
                         sum(s["products"] for s in shards), len(missing), len(reused), report["build_seconds"], report)
    if failing:
        details = ", ".join(f"{s['shard_id']} ({s['faiss_factory']}, {s['vectors']:,} vectors): "
                            f"{s['recall_at_10']:.3f}" for s in failing)
        raise IndexCheckFailed(
            f"recall@10 below index.min_recall={cfg.min_recall} for {details}; snapshot {snapshot_id} will not be "
            "published. Raise index.memory_budget_mb (a more exact index type), raise index.target_recall or "
            "unset a fixed index.nprobe / index.ef_search, then rebuild", failing)
    return result


def _describe_model(model: Any) -> tuple[dict, dict[str, bytes]]:
    """(description for the manifest, files the snapshot must carry to reproduce query vectors)."""
    if model is None:
        from pipelines.embed import default_spec  # here: keeps torch out of import time

        model = default_spec()
    if isinstance(model, dict):
        if not model.get("version"):
            raise IndexBuildError("the model description needs at least a 'version' (the embeddings/ folder name)")
        return dict(model), {}
    info = model.describe()
    files = {}
    if getattr(model, "pca", None) is not None:
        files[MODEL_PCA_PATH] = model.pca.to_bytes()  # search must apply the same projection to queries
    return info, files


def _threads_per_task(spark, build_tasks: int) -> int:
    """Cores per shard build: on Spark the shard tasks running at once share the cores; the local
    runner builds one shard at a time with every core."""
    if spark is None:
        return os.cpu_count() or 1
    return max(1, default_parallelism(spark) // max(1, build_tasks))


def run_tasks_for_index(tasks: list, runner: str, spark, description: str, fn=None) -> list[dict]:
    return run_tasks(fn or run_shard_task, tasks, runner=runner, spark=spark, description=description)


def _quarantine_missing(storage: Storage, run_id: str, members: pa.Table, missing: list[str]) -> None:
    """Rows whose canonical image has no vector (the embed stage quarantined it) end here, with a reason."""
    rows = members.filter(pc.is_in(members.column("sha256"), value_set=pa.array(missing)))
    now = datetime.now(timezone.utc)
    table = pa.table({
        "run_id": [run_id] * rows.num_rows,
        "stage": ["index"] * rows.num_rows,
        "reason": [MISSING_EMBEDDING] * rows.num_rows,
        "detail": ["no vector for the canonical image in the embeddings cache"] * rows.num_rows,
        "row_index": pa.nulls(rows.num_rows, pa.int64()),
        "product_id": rows.column("product_id"),
        "category": rows.column("category"),
        "image_url": rows.column("image_url"),
        "sha256": rows.column("sha256"),
        "http_status": pa.nulls(rows.num_rows, pa.int32()),
        "at": pa.array([now] * rows.num_rows, type=pa.timestamp("us", tz="UTC")),
    }, schema=QUARANTINE)
    storage.write_table(missing_embedding_quarantine_key(run_id), table)


def model_for_version(version: str | None) -> Any:
    """The model to record for `--model-version`: the installed spec when it is that version,
    else a bare description (such a snapshot is searchable by vector, not by image)."""
    from pipelines.embed import (  # here: keeps torch out of import time
        default_spec,
        model_version,
    )

    spec = default_spec()
    if version is None or model_version(spec) == version:
        return spec
    return {"name": "unknown", "version": version, "weights_sha256": None, "preprocessing": None, "dim": None}
