"""Index build: shard planning, index type choice, recall check, Spark build, category backfill, what each task reads."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines.index.tasks as index_tasks
from pipelines.config import IndexSettings, load_settings
from pipelines.index import IndexBuildError, IndexCheckFailed, build_index
from pipelines.index.plan import choose_index_type, plan_shards
from pipelines.index.shard import build_shard
from pipelines.index.vectors import ArrayVectors, FileVectors
from pipelines.layout import dedup_images_key, embeddings_prefix, snapshot_prefix
from pipelines.publish import PublishError, publish_snapshot, read_manifest
from pipelines.storage import open_storage
from schemas.tables import EMBEDDINGS
from synthetic_catalog import MODEL, clustered_vectors, write_catalog

CATEGORIES = {"food": 900, "tools": 500, "office": 300, "toys": 200}
SMALL = IndexSettings(max_vectors_per_shard=800, flat_max_vectors=400, hnsw_max_vectors=0, recall_queries=100)


@pytest.fixture
def warehouse(tmp_path):
    uri = (tmp_path / "warehouse").as_uri()
    return load_settings(warehouse=uri), open_storage(uri)


# -- planning --------------------------------------------------------------------------------

def test_plan_keeps_each_category_in_as_few_shards_as_possible():
    plans = plan_shards({"food": 2500, "tools": 700, "office": 400, "toys": 250, "garden": 90}, 1000)
    assert all(plan.vectors <= 1000 for plan in plans)
    homes = {}
    for plan in plans:
        for category in plan.categories:
            homes.setdefault(category, []).append(plan.shard_id)
    assert len(homes["food"]) == 3                          # bigger than a shard: split, alone
    assert all(len(homes[c]) == 1 for c in ("tools", "office", "toys", "garden"))
    food_shards = [p for p in plans if p.categories == ["food"]]
    assert sorted(p.vectors for p in food_shards) == [833, 833, 834]
    assert sum(p.vectors for p in plans) == 2500 + 700 + 400 + 250 + 90
    assert plans == plan_shards({"garden": 90, "toys": 250, "office": 400, "tools": 700, "food": 2500}, 1000)


def test_index_type_follows_shard_size_and_memory_budget():
    cfg = IndexSettings(memory_budget_mb=4096)
    assert choose_index_type(5_000, 1280, cfg).kind == "flat"
    assert choose_index_type(80_000, 1280, cfg).kind == "hnsw"
    assert choose_index_type(500_000, 1280, cfg).kind == "ivf_flat"        # 2.6 GB of raw vectors fit
    assert choose_index_type(1_000_000, 1280, cfg).kind == "ivf_sq8"       # 5.1 GB do not; 1.3 GB of SQ8 do
    pq_choice = choose_index_type(1_000_000, 1280, IndexSettings(memory_budget_mb=512))
    assert pq_choice.kind == "ivf_pq" and 1280 % pq_choice.pq_m == 0
    assert pq_choice.estimated_bytes <= 512 * 2**20
    with pytest.raises(IndexBuildError, match="raise the budget or lower index.max_vectors_per_shard"):
        choose_index_type(1_000_000, 1280, IndexSettings(memory_budget_mb=16))


# -- one shard -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_sq8", "ivf_pq"])
def test_every_index_type_reaches_its_recall_on_held_out_vectors(kind):
    vectors = clustered_vectors(3000, 32, clusters=30, rng=np.random.default_rng(1))
    cfg = IndexSettings(index_type=kind, recall_queries=100, target_recall=0.95, hnsw_m=16)
    built = build_shard(ArrayVectors(vectors), cfg, threads=2)
    assert built.index.ntotal == 3000
    floor = 0.6 if kind == "ivf_pq" else 0.9  # PQ's recall is capped by its code size, not by nprobe
    assert built.recall_at_10 >= floor, (kind, built.recall_at_10, built.tuning)
    if kind.startswith("ivf"):
        assert "nprobe" in built.search_params
    if kind == "hnsw":
        assert "efSearch" in built.search_params


def test_vectors_read_from_a_file_build_the_same_index(tmp_path):
    vectors = clustered_vectors(3000, 16, clusters=20, rng=np.random.default_rng(2))
    path = tmp_path / "vectors.npy"
    np.save(path, vectors)
    cfg = IndexSettings(index_type="ivf_flat", recall_queries=50)
    from_file = build_shard(FileVectors.open_npy(path), cfg, threads=1)
    in_memory = build_shard(ArrayVectors(vectors), cfg, threads=1)
    assert from_file.search_params == in_memory.search_params
    assert from_file.recall_at_10 == in_memory.recall_at_10


# -- the whole build -------------------------------------------------------------------------

def test_build_on_spark_maps_every_product_and_quarantines_missing_vectors(spark, warehouse):
    settings, storage = warehouse
    vectors = write_catalog(storage, "r1", CATEGORIES, missing=4)
    result = build_index(settings, "r1", model=MODEL, cfg=SMALL, runner="spark", spark=spark)
    assert result.status == "passed"
    assert result.vectors == len(vectors) - 4
    assert result.missing_embeddings == 4
    shard_of = {c: [s["shard_id"] for s in result.shards if c in s["categories"]] for c in CATEGORIES}
    assert len(shard_of["food"]) == 2 and all(len(shard_of[c]) == 1 for c in ("tools", "office", "toys"))
    assert {s["index_type"] for s in result.shards} <= {"flat", "ivf_flat"}

    prefix = snapshot_prefix("catalog", result.snapshot_id)
    idmap = pq.read_table(storage.uri_for(prefix + result.shards[0]["files"]["idmap"]["path"])[7:])
    assert idmap.schema.names == ["vector_id", "sha256", "product_id", "category", "image_url", "title"]
    # every 10th product reuses the previous product's image: one vector, two products
    per_vector = idmap.group_by("vector_id").aggregate([("product_id", "count")])
    assert max(per_vector.column("product_id_count").to_pylist()) == 2
    total_products = sum(s["products"] for s in result.shards)
    quarantined = storage.read_table("quarantine/r1/index/")
    assert set(quarantined.column("reason").to_pylist()) == {"missing_embedding"}
    assert total_products + quarantined.num_rows == sum(CATEGORIES.values())  # every row in exactly one place
    build = json.loads(storage.read_text(prefix + "_build.json"))
    assert build["status"] == "passed" and build["dimension"] == 32
    assert not storage.list(prefix + "_staging/")


def test_recall_check_stops_a_broken_index_before_publish(warehouse):
    settings, storage = warehouse
    write_catalog(storage, "r1", {"food": 3000}, dim=48, shared_every=10**9)
    broken = IndexSettings(max_vectors_per_shard=5000, index_type="ivf_flat", nlist=64, nprobe=1,
                           train_points_per_list=8, kmeans_iterations=1, recall_queries=100, min_recall=0.9)
    with pytest.raises(IndexCheckFailed, match="recall@10 below index.min_recall=0.9") as failure:
        build_index(settings, "r1", model=MODEL, cfg=broken, runner="local")
    assert failure.value.failing[0]["recall_at_10"] < 0.9
    snapshot_id = storage.list_dirs("indexes/catalog")[0]
    assert json.loads(storage.read_text(snapshot_prefix("catalog", snapshot_id) + "_build.json"))["status"] == \
        "failed_recall_check"
    with pytest.raises(PublishError, match="did not pass its recall check"):
        publish_snapshot(storage, "catalog", snapshot_id=snapshot_id)
    assert not storage.exists("indexes/catalog/LATEST")


def test_missing_inputs_say_what_to_run(warehouse):
    settings, storage = warehouse
    with pytest.raises(IndexBuildError, match="run the dedup stage first"):
        build_index(settings, None, model=MODEL, cfg=SMALL, runner="local")
    write_catalog(storage, "r1", {"food": 50})
    with pytest.raises(IndexBuildError, match=r"no embeddings for model version other-v2 .*test-model-v1"):
        build_index(settings, "r1", model={**MODEL, "version": "other-v2"}, cfg=SMALL, runner="local")


def test_category_backfill_reuses_other_shards_byte_for_byte(warehouse):
    settings, storage = warehouse
    write_catalog(storage, "r1", CATEGORIES)
    first = build_index(settings, "r1", model=MODEL, cfg=SMALL, runner="local")
    publish_snapshot(storage, "catalog")
    # Night 2: the analyst re-crawled "toys" only; its images and vectors changed, the rest did not.
    write_catalog(storage, "r2", CATEGORIES, changed={"toys": "night 2"})

    second = build_index(settings, "r2", model=MODEL, cfg=SMALL, runner="local", categories=["toys"])
    before = {s["shard_id"]: s for s in first.shards}
    toys_before = next(s for s in first.shards if "toys" in s["categories"])
    reused = [s for s in second.shards if s.get("reused_from")]
    rebuilt = [s for s in second.shards if not s.get("reused_from")]
    assert second.reused_shards == len(reused) == len(first.shards) - 1
    for shard in reused:
        assert "toys" not in shard["categories"] and shard["reused_from"] == first.snapshot_id
        for role in ("index", "idmap"):
            path = before[shard["shard_id"]]["files"][role]["path"]
            assert storage.read_bytes(snapshot_prefix("catalog", second.snapshot_id) + path) == \
                storage.read_bytes(snapshot_prefix("catalog", first.snapshot_id) + path)
    # toys' shard (with whatever was packed beside it) is rebuilt under a new shard id
    assert {c for s in rebuilt for c in s["categories"]} == set(toys_before["categories"])
    assert all(s["shard_id"] not in before for s in rebuilt)
    assert rebuilt[0]["files"]["index"]["sha256"] != toys_before["files"]["index"]["sha256"]

    published = publish_snapshot(storage, "catalog")
    manifest = read_manifest(storage, "catalog", published.snapshot_id)
    assert manifest["backfill"] == {"categories": ["toys"], "base_snapshot": first.snapshot_id}
    assert manifest["previous_snapshot"] == first.snapshot_id
    assert sorted(c for s in manifest["shards"] for c in s["categories"]) == sorted(
        c for s in first.shards for c in s["categories"])


# -- what each task reads ----------------------------------------------------------------------

@pytest.fixture
def vector_reads(monkeypatch):
    """Every (file, row group, images) whose vectors the build reads, in order."""
    reads = []
    original = index_tasks.read_vector_row_groups

    def recording(storage, piece):
        for group, table in original(storage, piece):
            reads.append((piece.key, group, table.column("sha256").to_pylist()))
            yield group, table

    monkeypatch.setattr(index_tasks, "read_vector_row_groups", recording)
    return reads


def _idmap_shas(storage, snapshot_id, shard):
    path = snapshot_prefix("catalog", snapshot_id) + shard["files"]["idmap"]["path"]
    return set(pq.read_table(storage.uri_for(path)[7:], columns=["sha256"]).column("sha256").to_pylist())


def test_each_shard_task_reads_only_its_own_vectors(warehouse, vector_reads):
    settings, storage = warehouse
    # Embed tasks write vectors in sha256 order: every part holds images of every category.
    write_catalog(storage, "r1", CATEGORIES, embed_part_rows=250)
    result = build_index(settings, "r1", model=MODEL, cfg=SMALL, runner="local")
    assert len(result.shards) == 4
    cache = [read for read in vector_reads if read[0].startswith(embeddings_prefix(MODEL["version"]))]
    parts = storage.list(embeddings_prefix(MODEL["version"]))
    assert sorted((key, group) for key, group, _ in cache) == [(key, 0) for key in parts]  # each row group once
    for shard in result.shards:
        own = [sha for key, _, shas in vector_reads if f"/vectors/{shard['shard_id']}/" in key for sha in shas]
        assert sorted(own) == sorted(_idmap_shas(storage, result.snapshot_id, shard))  # its vectors, nothing else
    assert result.report["vector_reads"]["mode"] == "routed"


def test_category_backfill_reads_only_the_rebuilt_categories_vectors(warehouse, tmp_path, vector_reads):
    settings, storage = warehouse
    first_vectors = write_catalog(storage, "r1", CATEGORIES)
    build_index(settings, "r1", model=MODEL, cfg=SMALL, runner="local")
    publish_snapshot(storage, "catalog")
    # Night 2 re-crawled "toys" only: the embed stage embedded its new images into a part of their
    # own; the parts holding every other category's vectors are untouched.
    night2 = open_storage((tmp_path / "night2").as_uri())
    vectors = write_catalog(night2, "r2", CATEGORIES, changed={"toys": "night 2"})
    storage.write_bytes(dedup_images_key("r2"), night2.read_bytes(dedup_images_key("r2")))
    new = {sha: vector for sha, vector in vectors.items() if sha not in first_vectors}
    now = datetime(2026, 11, 24, 3, 0, tzinfo=timezone.utc)
    new_part = f"{embeddings_prefix(MODEL['version'])}part-r2-0.parquet"
    storage.write_table(new_part, pa.Table.from_pylist(
        [{"sha256": sha, "vector": vector.tolist(), "model_version": MODEL["version"], "run_id": "r2",
          "embedded_at": now} for sha, vector in new.items()], schema=EMBEDDINGS))
    vector_reads.clear()

    second = build_index(settings, "r2", model=MODEL, cfg=SMALL, runner="local", categories=["toys"])
    rebuilt = [s for s in second.shards if not s.get("reused_from")]
    assert [s["categories"] for s in rebuilt] == [["toys"]] and rebuilt[0]["vectors"] == len(new)
    assert {key for key, _, _ in vector_reads} == {new_part}   # no other part's vectors were read
    assert sorted(sha for _, _, shas in vector_reads for sha in shas) == sorted(new)
    assert second.report["vector_reads"]["mode"] == "direct"


def test_build_on_s3_reads_vectors_by_byte_range(s3_bucket):
    bucket, s3 = s3_bucket
    uri = f"s3://{bucket}/warehouse"
    settings, storage = load_settings(warehouse=uri, s3=s3.model_dump()), open_storage(uri, s3)
    vectors = write_catalog(storage, "r1", {"food": 600, "tools": 400}, embed_part_rows=200)
    result = build_index(settings, "r1", model=MODEL, cfg=SMALL, runner="local")
    assert result.status == "passed" and result.vectors == len(vectors) and len(result.shards) == 2
    assert result.report["vector_reads"] == {"mode": "routed", "route_tasks": 1,
                                             "embeddings_row_groups_read": -(-len(vectors) // 200),
                                             "embeddings_rows_read": len(vectors)}
    assert not storage.list(snapshot_prefix("catalog", result.snapshot_id) + "_staging/")
