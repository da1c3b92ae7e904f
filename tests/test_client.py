"""Serving: pull (verify, atomic swap, no-op, refusal), search merging, and the search CLI."""
from __future__ import annotations

import argparse
import json
import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import pipelines.cli as cli
from pipelines.client import SnapshotClient, current_snapshot_id, pull
from pipelines.config import IndexSettings, load_settings
from pipelines.index import build_index
from pipelines.cli.index import add_index_commands
from pipelines.layout import snapshot_prefix
from pipelines.publish import SnapshotVerificationError, publish_snapshot
from pipelines.storage import open_storage
from schemas.tables import DEDUP_IMAGES, EMBEDDINGS
from synthetic_catalog import MODEL, write_catalog

CATEGORIES = {"food": 400, "tools": 250, "toys": 120}
CFG = IndexSettings(max_vectors_per_shard=400, flat_max_vectors=200, recall_queries=40)
OPENCLIPART = Path("/usr/share/openclipart/png")


# Shards of three kinds (Flat, HNSW, IVF) from the same small catalog.
MIXED_CFG = IndexSettings(max_vectors_per_shard=370, flat_max_vectors=120, hnsw_max_vectors=340, recall_queries=40)


def publish_new(settings, storage, run_id="r1", keep=5, cfg=CFG):
    built = build_index(settings, run_id, model=MODEL, cfg=cfg, runner="local")
    return publish_snapshot(storage, "catalog", snapshot_id=built.snapshot_id, keep_snapshots=keep)


@pytest.fixture
def local_warehouse(tmp_path):
    uri = (tmp_path / "warehouse").as_uri()
    storage = open_storage(uri)
    vectors = write_catalog(storage, "r1", CATEGORIES)
    return load_settings(warehouse=uri), storage, vectors


@pytest.fixture
def s3_warehouse(s3_bucket):
    bucket, s3 = s3_bucket
    uri = f"s3://{bucket}/wh"
    storage = open_storage(uri, s3)
    write_catalog(storage, "r1", {"food": 200, "tools": 120, "toys": 60})
    return load_settings(warehouse=uri, s3=s3.model_dump()), storage, s3


# -- pull ------------------------------------------------------------------------------------

def test_pull_verifies_swaps_atomically_and_is_a_no_op_when_current(local_warehouse, tmp_path):
    settings, storage, _ = local_warehouse
    first = publish_new(settings, storage)
    dest = tmp_path / "serving"
    pulled = pull(settings.warehouse, dest)
    assert pulled.changed and pulled.snapshot_id == first.snapshot_id
    assert os.readlink(dest / "current") == f"snapshots/{first.snapshot_id}"
    assert (dest / "current" / "manifest.json").is_file()
    again = pull(settings.warehouse, dest)
    assert not again.changed and again.snapshot_id == first.snapshot_id

    open_before = SnapshotClient(dest)
    second = publish_new(settings, storage)
    swapped = pull(settings.warehouse, dest)
    assert swapped.changed and swapped.previous == first.snapshot_id
    assert current_snapshot_id(dest) == second.snapshot_id
    assert open_before.snapshot_id == first.snapshot_id          # an open client keeps its snapshot
    assert SnapshotClient(dest).snapshot_id == second.snapshot_id
    assert sorted(p.name for p in (dest / "snapshots").iterdir()) == sorted([first.snapshot_id, second.snapshot_id])


def test_pull_refuses_a_corrupted_shard_and_keeps_the_current_copy(s3_warehouse, tmp_path):
    settings, storage, s3 = s3_warehouse
    first = publish_new(settings, storage)
    dest = tmp_path / "serving"
    pull(settings.warehouse, dest, s3=s3)
    second = publish_new(settings, storage)
    shard = second.manifest["shards"][0]["files"]["index"]
    key = snapshot_prefix("catalog", second.snapshot_id) + shard["path"]
    data = bytearray(storage.read_bytes(key))
    data[len(data) // 2] ^= 0xFF                                 # one flipped byte, same size
    storage.write_bytes(key, bytes(data))
    with pytest.raises(SnapshotVerificationError, match=shard["path"]) as refused:
        pull(settings.warehouse, dest, s3=s3)
    assert refused.value.bad_files and "roll back" in str(refused.value)
    assert current_snapshot_id(dest) == first.snapshot_id
    assert [p.name for p in (dest / "snapshots").iterdir()] == [first.snapshot_id]  # no partial copy left


def test_a_pull_during_publishes_always_gets_a_complete_snapshot(s3_warehouse, tmp_path):
    settings, storage, s3 = s3_warehouse
    publish_new(settings, storage)
    published, pulled, errors = [], [], []
    publishing = threading.Event()
    publishing.set()

    def publisher():
        try:
            for _ in range(2):
                published.append(publish_new(settings, storage, keep=10).snapshot_id)
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            publishing.clear()

    def puller():
        dest = tmp_path / "serving"
        try:
            while publishing.is_set() or not pulled:
                result = pull(settings.warehouse, dest, s3=s3)
                client = SnapshotClient(dest, verify=True)       # every file re-hashed
                assert client.snapshot_id == result.snapshot_id
                assert sum(s.index.ntotal for s in client.shards) == client.manifest["totals"]["vectors"]
                pulled.append(result.snapshot_id)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publisher), threading.Thread(target=puller)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(published) == 2 and pulled
    assert pull(settings.warehouse, tmp_path / "serving", s3=s3).snapshot_id == published[-1]


# -- search ----------------------------------------------------------------------------------

def test_search_vectors_returns_unique_products_best_first(local_warehouse, tmp_path):
    settings, storage, vectors = local_warehouse
    publish_new(settings, storage)
    pull(settings.warehouse, tmp_path / "serving")
    client = SnapshotClient(tmp_path / "serving")
    dedup = storage.read_table("dedup/r1/images.parquet").to_pylist()
    shared = next(row["sha256"] for i, row in enumerate(dedup) if i and row["sha256"] == dedup[i - 1]["sha256"])
    owners = sorted(row["product_id"] for row in dedup if row["sha256"] == shared)
    hits = client.search_vectors(vectors[shared], k=10)[0]
    assert len(hits) == 10
    assert sorted(h.product_id for h in hits[:2]) == owners    # one image, two products, both on top
    assert hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert len({h.product_id for h in hits}) == 10
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    toys = client.search_vectors(vectors[shared], k=15, category="toys")[0]
    assert len(toys) == 15 and {h.category for h in toys} == {"toys"}
    assert client.search_vectors(np.ones(32), k=5, category="garden") == [[]]
    with pytest.raises(ValueError, match="dimension 16"):
        client.search_vectors(np.ones(16), k=5)


def run_cli(argv, capsys) -> tuple[int, list[dict], str]:
    """`catalog-index ...` with the index commands, whether or not cli.build_parser has them yet."""
    original = cli.build_parser

    def build_parser():
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "build-index" not in sub.choices:
            add_index_commands(sub)
        return parser

    cli.build_parser = build_parser
    try:
        code = cli.main(argv)
    finally:
        cli.build_parser = original
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.strip()]
    return code, lines, captured.err


@pytest.mark.skipif(not OPENCLIPART.is_dir(), reason="sample catalog (openclipart-png) not installed")
def test_search_cli_embeds_query_images_and_prints_json_lines(tmp_path, capsys):
    """End to end with the real model: embed a few sample PNGs, build, publish, pull, search."""
    from pipelines.embed.embedder import get_embedder
    from pipelines.embed.model import default_spec, model_version

    images = []
    for category in ("food", "tools", "transportation"):
        images += [(category, p) for p in sorted((OPENCLIPART / category).glob("*.png"))[:3]]
    spec = default_spec()
    version = model_version(spec)
    embedder = get_embedder(spec, "cpu")
    items = [(f"{i:064x}", path.read_bytes()) for i, (_, path) in enumerate(images)]
    vectors = {}
    for batch in embedder.embed_images(items):
        vectors.update(zip(batch.embeddings["sha256"], batch.embeddings["vector"]))
    uri = (tmp_path / "warehouse").as_uri()
    storage = open_storage(uri)
    rows = [{"product_id": f"p{i}", "category": category, "image_url": path.as_uri(), "title": path.stem,
             "sha256": f"{i:064x}", "cluster_id": f"{i:064x}", "canonical_sha256": f"{i:064x}",
             "is_canonical": True, "duplicate_kind": "none", "run_id": "r1"} for i, (category, path) in enumerate(images)]
    storage.write_table("dedup/r1/images.parquet", pa.Table.from_pylist(rows, schema=DEDUP_IMAGES))
    storage.write_text("dedup/r1/_SUCCESS.json", "{}")  # build-index indexes committed dedup output only
    storage.write_table(f"embeddings/{version}/part-00000.parquet", pa.Table.from_pylist(
        [{"sha256": sha, "vector": vector.tolist(), "model_version": version, "run_id": "r1"}
         for sha, vector in vectors.items()], schema=EMBEDDINGS))

    common = ["--warehouse", uri]
    code, _, err = run_cli(["build-index", *common, "--run-id", "r1", "--runner", "local"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["publish", *common], capsys)
    assert code == 0 and "published" in err
    code, listed, _ = run_cli(["snapshots", *common, "--json"], capsys)
    assert [s["state"] for s in listed] == ["live"]

    dest = tmp_path / "serving"
    code, _, err = run_cli(["pull", *common, "--dest", str(dest)], capsys)
    assert code == 0 and "verified" in err
    queries = [str(images[0][1]), str(images[4][1])]
    code, lines, err = run_cli(["search", "--snapshot-dir", str(dest), "--image", *queries, "--k", "3", "--json"], capsys)
    assert code == 0, err
    assert [line["query"] for line in lines] == queries
    for line, expected in zip(lines, ["p0", "p4"]):
        assert len(line["results"]) == 3
        assert set(line["results"][0]) == {"product_id", "category", "score", "image_url"}
        assert line["results"][0]["product_id"] == expected and line["results"][0]["score"] > 0.99
        assert len({r["product_id"] for r in line["results"]}) == 3

    folder = tmp_path / "queries"
    folder.mkdir()
    (folder / "a.png").write_bytes(images[7][1].read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    code, lines, _ = run_cli(["search", *common, "--cache-dir", str(tmp_path / "cache"), "--image-dir", str(folder),
                              "--k", "2", "--category", "transportation", "--json"], capsys)
    assert code == 0
    assert lines[0]["results"][0]["product_id"] == "p7"
    assert {r["category"] for r in lines[0]["results"]} == {"transportation"}
    assert lines[1]["results"] == [] and "not_an_image" in lines[1]["error"]


# -- memory-mapped opening, Arrow id maps, refresh --------------------------------------------

def test_mmap_client_gives_the_same_results_and_keeps_no_python_object_per_row(local_warehouse, tmp_path):
    import pyarrow as pa

    settings, storage, vectors = local_warehouse
    publish_new(settings, storage, cfg=MIXED_CFG)
    pull(settings.warehouse, tmp_path / "serving")
    in_ram, mapped = SnapshotClient(tmp_path / "serving"), SnapshotClient(tmp_path / "serving", mmap=True)
    kinds = {s.kind for s in mapped.shards}
    assert len(kinds) >= 2 and any(kind.startswith("ivf") for kind in kinds), kinds
    for shard in mapped.shards:
        assert shard.mmapped and shard.index.ntotal == shard.entry["vectors"]
        assert all(isinstance(column, pa.Array) for column in shard.columns.values())
        assert shard.vector_ids.dtype == np.int64 and shard.category_codes.dtype == np.int32
    rng = np.random.default_rng(7)
    shas = sorted(vectors)
    queries = np.stack([vectors[shas[i]] for i in rng.choice(len(shas), 12, replace=False)])
    queries[6:] += rng.standard_normal((6, queries.shape[1])).astype(np.float32) * 0.3  # off-catalog queries too
    for category in (None, "food", "toys"):
        expected = in_ram.search_vectors(queries, k=7, category=category)
        got = mapped.search_vectors(queries, k=7, category=category)
        assert [[(h.product_id, h.category, h.image_url, round(h.score, 5)) for h in hits] for hits in got] == \
               [[(h.product_id, h.category, h.image_url, round(h.score, 5)) for h in hits] for hits in expected]
        for hits in got:
            assert len(hits) == 7 and len({h.product_id for h in hits}) == 7
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            assert category is None or {h.category for h in hits} == {category}
    # Each indexed image is its own best match: its product (or one sharing its picture) comes first.
    dedup = storage.read_table("dedup/r1/images.parquet").to_pylist()
    owners: dict[str, set] = {}
    for row in dedup:
        owners.setdefault(row["sha256"], set()).add(row["product_id"])
    for sha in shas[:40]:
        top = mapped.search_vectors(vectors[sha], k=3)[0][0]
        assert top.product_id in owners[sha] and top.score == pytest.approx(1.0, abs=1e-4)


def test_similar_products_come_from_the_stored_vector_and_leave_the_product_out(local_warehouse, tmp_path):
    settings, storage, vectors = local_warehouse
    publish_new(settings, storage, cfg=MIXED_CFG)
    pull(settings.warehouse, tmp_path / "serving")
    client = SnapshotClient(tmp_path / "serving", mmap=True)
    dedup = storage.read_table("dedup/r1/images.parquet").to_pylist()
    for row in dedup[::97]:  # every shard kind: flat, IVF, ...
        similar = client.snapshot.similar_products(row["product_id"], k=5)
        assert len(similar) == 5 and row["product_id"] not in {h.product_id for h in similar}
        expected = [h for h in client.search_vectors(vectors[row["sha256"]], k=6)[0]
                    if h.product_id != row["product_id"]][:5]
        assert [h.product_id for h in similar] == [h.product_id for h in expected]
    assert client.snapshot.similar_products("no-such-product") is None


def test_refresh_follows_current_and_refuses_a_damaged_snapshot(local_warehouse, tmp_path):
    settings, storage, vectors = local_warehouse
    first = publish_new(settings, storage)
    dest = tmp_path / "serving"
    pull(settings.warehouse, dest)
    client = SnapshotClient(dest, mmap=True, verify=None)
    assert client.refresh() is False and client.snapshot_id == first.snapshot_id
    old = client.snapshot
    query = vectors[sorted(vectors)[3]]
    before = old.search_vectors(query, k=5)

    second = publish_new(settings, storage)
    pull(settings.warehouse, dest)
    assert client.refresh() is True and client.snapshot_id == second.snapshot_id
    assert [h.product_id for h in old.search_vectors(query, k=5)[0]] == [h.product_id for h in before[0]]

    third = publish_new(settings, storage)
    pull(settings.warehouse, dest)
    damaged = dest / "snapshots" / third.snapshot_id / third.manifest["shards"][0]["files"]["index"]["path"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF                                  # same size: only a hash notices
    damaged.write_bytes(bytes(data))
    (dest / "snapshots" / third.snapshot_id / ".verified").unlink()  # not what pull verified any more
    with pytest.raises(SnapshotVerificationError, match="sha256"):
        client.refresh()
    assert client.snapshot_id == second.snapshot_id and client.search_vectors(query, k=5)[0]
    damaged.write_bytes(bytes(data[:-1]))                           # a short file fails even with verify=False
    with pytest.raises(SnapshotVerificationError, match="bytes"):
        SnapshotClient(dest, mmap=True)
