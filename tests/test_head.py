"""petastorm loaders and `train-head`: real petastorm readers over real warehouse Parquet parts.

The tables are written with their schemas (schemas/tables.py) straight into a warehouse, so
these tests need no Spark; test_embed_stage.py covers how those tables come to be.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import make_jpeg, make_png
from pipelines.config import load_settings
from pipelines.layout import dedup_success_key
from pipelines.layout import embeddings_prefix
from pipelines.embed.head import ADOPTED_KEY, HeadSettings, load_adopted_head, split_by_product, train_head
from pipelines.cli.head import add_head_commands
from pipelines.embed.model import Preprocessing
from pipelines.embed.loaders import (embed_loader_batches, failure_reasons, hex_digests, open_embedding_loader,
                                         open_image_loader)
from pipelines.storage import S3Storage, open_storage
from schemas.tables import DEDUP_IMAGES, EMBEDDINGS, IMAGES

# petastorm 0.13.1 runs on pyarrow 14's legacy dataset API (DESIGN.md, install traps) and says so on every read.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning:petastorm.*")

NOW = datetime(2026, 11, 23, 3, 0, tzinfo=timezone.utc)
VERSION = "synthetic-v1"


def sha(data: bytes | str) -> str:
    return hashlib.sha256(data if isinstance(data, bytes) else data.encode()).hexdigest()


# -- the image loader ----------------------------------------------------------------------------

def write_image_parts(storage) -> tuple[dict[str, bytes], list[str]]:
    """Three images-table parts, one under a category whose name needs quoting, one corrupt image,
    one image stored in two rows. Returns ({sha256: bytes}, the sha256 of every row)."""
    parts = {
        "images/category=food/run_id=r1/part-00000.parquet": [make_png((200, 30, 30), (64, 48), 1),
                                                              make_jpeg((30, 120, 200), (80, 60)),
                                                              make_png((200, 30, 30), (64, 48), 1)],  # 2 products
        "images/category=home%20garden/run_id=r1/part-00000.parquet": [make_png((20, 200, 30), (300, 40), 2),
                                                                       b"\x89PNG\r\n\x1a\n" + b"\x00" * 40],
        "images/category=food/run_id=r0/part-00000.parquet": [make_png((90, 90, 200), (32, 32), 3)],
    }
    stored, rows_written = {}, []
    for key, images in parts.items():
        category = "home garden" if "home" in key else "food"
        rows = [{"product_id": f"p-{sha(data)[:6]}", "category": category, "image_url": "http://x/i.png",
                 "sha256": sha(data), "run_id": "r1", "image": data, "fetched_at": NOW} for data in images]
        storage.write_table(key, pa.Table.from_pylist(rows, schema=IMAGES))
        stored.update({sha(data): data for data in images})
        rows_written.extend(sha(data) for data in images)
    return stored, rows_written


def read_all(storage, keys, **options):
    pixels, failures, shas = [], [], []
    with open_image_loader(storage, keys, Preprocessing(), batch_size=2, **options) as loader:
        for batch in loader:
            assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape[1:] == (224, 224, 3)
            pixels.append(batch["pixels"].numpy())
            failures.extend(batch["failure"].tolist())
            shas.extend(hex_digests(batch["sha256_digest"]))
    return shas, np.concatenate(pixels), failures


def test_image_loader_decodes_every_stored_image(tmp_path):
    from pipelines.embed.embedder import ImageDecodeError, decode_for_model

    storage = open_storage(str(tmp_path / "wh"))
    stored, rows = write_image_parts(storage)
    keys = [k for k in storage.list("images/") if k.endswith(".parquet")]
    shas, pixels, failures = read_all(storage, keys)

    assert sorted(shas) == sorted(rows)  # every stored row exactly once
    by_sha = dict(zip(shas, zip(pixels, failures)))
    corrupt = sha(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with pytest.raises(ImageDecodeError) as raised:
        decode_for_model(stored[corrupt], Preprocessing())
    assert failure_reasons()[by_sha[corrupt][1]] == raised.value.reason and not by_sha[corrupt][0].any()
    for key, data in stored.items():
        if key != corrupt:  # the same pixels the embed stage's own decoder gives
            assert by_sha[key][1] == 0 and np.array_equal(by_sha[key][0], decode_for_model(data, Preprocessing()))

    wanted = {s for s in stored if s != corrupt}
    only, _, _ = read_all(storage, keys, sha256s=wanted, pool="dummy")
    assert sorted(only) == sorted(r for r in rows if r in wanted)


@pytest.mark.s3
def test_image_loader_reads_s3_warehouse_through_a_local_copy(s3_bucket, tmp_path):
    bucket, s3 = s3_bucket
    storage = S3Storage(bucket, "wh", s3)
    _, rows = write_image_parts(storage)
    keys = [k for k in storage.list("images/") if k.endswith(".parquet")]
    shas, pixels, _ = read_all(storage, keys)
    assert sorted(shas) == sorted(rows) and pixels.shape == (len(rows), 224, 224, 3)

    cache = tmp_path / "cache"
    first = read_all(storage, keys, local_cache_dir=str(cache))
    storage.delete_prefix("images/")  # a second reader with the same cache needs nothing from S3
    second = read_all(storage, keys, local_cache_dir=str(cache))
    assert sorted(first[0]) == sorted(second[0]) == sorted(rows)


def test_image_loader_feeds_the_embedder_with_the_same_vectors(tmp_path):
    from pipelines.embed.embedder import ImageEmbedder
    from pipelines.embed.model import default_spec

    storage = open_storage(str(tmp_path / "wh"))
    stored, _ = write_image_parts(storage)
    keys = [k for k in storage.list("images/") if k.endswith(".parquet")]
    embedder = ImageEmbedder(default_spec(), batch_size=8, cpu_budget=1)
    try:
        with open_image_loader(storage, keys, embedder.spec.preprocessing, batch_size=4) as loader:
            batches = list(embed_loader_batches(embedder, loader))
        direct = list(embedder.embed_images(sorted(stored.items())))
    finally:
        embedder.close()
    embedded = [r.sha256 for b in batches for r in b.embeddings.itertuples()]
    assert len(embedded) == len(set(embedded))  # the image stored twice is embedded once
    via_loader = {r.sha256: r.vector for b in batches for r in b.embeddings.itertuples()}
    via_embedder = {r.sha256: r.vector for b in direct for r in b.embeddings.itertuples()}
    assert via_loader.keys() == via_embedder.keys() and len(via_loader) == len(stored) - 1
    for key in via_loader:
        assert np.allclose(via_loader[key], via_embedder[key], atol=1e-4)
    assert [f.reason for b in batches for f in b.failures.itertuples()] == \
           [f.reason for b in direct for f in b.failures.itertuples()]


# -- synthetic catalogs for the head -------------------------------------------------------------

def write_catalog(storage, run_id: str, vectors: np.ndarray, categories: list[str], *, part_rows: int = 150,
                  duplicate_rows: int = 0) -> list[str]:
    """dedup/<run_id>/ (committed) + embeddings/<VERSION>/: one canonical image per vector.

    Every 7th product also uses the previous product's image, and every 11th product has a
    second image, so products and images form groups larger than one.
    `duplicate_rows` rows are written a second time in an extra part (a rerun of the embed stage).
    """
    shas = [sha(f"{run_id}/{index}") for index in range(len(vectors))]
    rows, product = [], 0
    for index, (image, category) in enumerate(zip(shas, categories)):
        owners = [f"p{product}"]
        if index % 7 == 6:
            owners.append(f"p{product - 1}")   # a product whose picture is the same as this one's
        if index % 11 == 10:
            owners = [f"p{product - 2}"]       # a second image of an earlier product
        else:
            product += 1
        for owner in owners:
            rows.append({"product_id": owner, "category": category, "image_url": f"http://x/{index}.png",
                         "sha256": image, "fetched_at": NOW, "cluster_id": image, "canonical_sha256": image,
                         "is_canonical": True, "duplicate_kind": "none", "run_id": run_id})
    storage.write_table(f"dedup/{run_id}/images.parquet", pa.Table.from_pylist(rows, schema=DEDUP_IMAGES))
    storage.write_text(dedup_success_key(run_id), "{}")
    storage.delete_prefix(embeddings_prefix(VERSION))
    order = np.random.default_rng(1).permutation(len(shas))
    parts = [order[start:start + part_rows] for start in range(0, len(order), part_rows)]
    if duplicate_rows:
        parts.append(order[:duplicate_rows])
    for number, indices in enumerate(parts):
        table = pa.Table.from_pylist([{"sha256": shas[i], "vector": vectors[i].tolist(), "model_version": VERSION,
                                       "run_id": run_id, "embedded_at": NOW} for i in indices], schema=EMBEDDINGS)
        storage.write_table(f"{embeddings_prefix(VERSION)}part-{number:05d}.parquet", table)
    return shas


def drowned_categories(count=480, categories=4, signal_dims=6, nuisance_dims=42, seed=0):
    """Categories separated only in a few low-variance dimensions, drowned by loud nuisance ones:
    raw cosine neighbours are close to random, a linear map that keeps the quiet dims is not."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, categories, count)
    centres = rng.standard_normal((categories, signal_dims)) * 0.5
    signal = centres[labels] + 0.08 * rng.standard_normal((count, signal_dims))
    vectors = np.hstack([signal, rng.standard_normal((count, nuisance_dims))]).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), [f"cat{label}" for label in labels]


def test_embedding_loader_yields_every_labelled_row_once_per_pass(tmp_path):
    storage = open_storage(str(tmp_path / "wh"))
    vectors, categories = drowned_categories(count=200)
    shas = write_catalog(storage, "r1", vectors, categories, part_rows=64, duplicate_rows=30)
    labels = {s: int(c[3:]) for s, c in zip(shas, categories) if int(s[:2], 16) % 5}  # some rows unlabelled
    expected = {s: vectors[i] for i, s in enumerate(shas) if s in labels}
    with open_embedding_loader(storage, VERSION, labels, batch_size=32, seed=3) as loader:
        passes = []
        for _ in range(2):  # iterating again reads the table again
            seen = []
            for batch in loader:
                got = hex_digests(batch["sha256_digest"])
                assert batch["vector"].shape == (len(got), 48)
                for key, vector, label in zip(got, batch["vector"].numpy(), batch["label"].tolist()):
                    assert np.allclose(vector, expected[key]) and label == labels[key]
                seen.extend(got)
            assert sorted(seen) == sorted(expected)  # once each: duplicates and unlabelled rows dropped
            passes.append(seen)
    with open_embedding_loader(storage, VERSION, labels, batch_size=32, seed=3) as again:
        assert [s for b in again for s in hex_digests(b["sha256_digest"])] == passes[0]  # seeded order


def test_split_keeps_every_product_on_one_side(tmp_path):
    storage = open_storage(str(tmp_path / "wh"))
    vectors, categories = drowned_categories(count=300)
    shas = write_catalog(storage, "r1", vectors, categories)
    from pipelines.dedup.stage import read_dedup_images

    dedup = read_dedup_images(storage, "r1")
    train, heldout, _, _ = split_by_product(dedup, set(shas), 0.25, seed=7)
    assert train | heldout == set(shas) and not train & heldout
    assert 0.2 <= len(heldout) / len(shas) <= 0.3
    sides = dedup.assign(side=dedup["canonical_sha256"].isin(heldout)).groupby("product_id")["side"].nunique()
    assert (sides == 1).all()
    assert split_by_product(dedup, set(shas), 0.25, seed=7)[1] == heldout


def run_cli(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser()
    add_head_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_head_adopted_where_categories_hide_in_quiet_dimensions(tmp_path, capsys):
    warehouse = str(tmp_path / "wh")
    storage = open_storage(warehouse)
    vectors, categories = drowned_categories()
    write_catalog(storage, "r1", vectors, categories)
    code = run_cli(["train-head", "--warehouse", warehouse, "--run-id", "r1", "--model-version", VERSION,
                    "--epochs", "12", "--dim", "8", "--holdout", "0.25", "--seed", "1"])
    assert code == 0
    decision = json.loads(storage.read_text(ADOPTED_KEY))
    metrics = decision["metrics"]
    assert decision["adopted"] and metrics["head_precision_at_k"] > metrics["raw_precision_at_k"] + 0.2
    assert metrics["train_images"] + metrics["heldout_images"] == len(vectors)
    printed = capsys.readouterr().err
    for number in (metrics["raw_precision_at_k"], metrics["head_precision_at_k"]):
        assert f"{number:.3f}" in printed
    assert "adopted" in printed and decision["head_version"] in printed
    saved = json.loads(storage.read_text(f"models/heads/{decision['head_version']}/metrics.json"))
    assert (saved["base_model_version"], saved["epochs"], saved["seed"]) == (VERSION, 12, 1)
    head, _ = load_adopted_head(storage)
    projected = head(torch.from_numpy(vectors[:5])).detach().numpy()
    assert projected.shape == (5, 8) and np.allclose(np.linalg.norm(projected, axis=1), 1, atol=1e-5)

    # Same seed, same data: the same head, bit for bit (the version is a digest of the weights).
    again = train_head(load_settings(warehouse=warehouse), "r1",
                       HeadSettings(epochs=12, dim=8, holdout=0.25, seed=1), model_version=VERSION)
    assert again.head_version == decision["head_version"]


def test_head_not_adopted_where_it_cannot_help(tmp_path):
    warehouse = str(tmp_path / "wh")
    storage = open_storage(warehouse)
    vectors, _ = drowned_categories()
    rng = np.random.default_rng(5)
    noise_labels = [f"cat{label}" for label in rng.integers(0, 4, len(vectors))]  # categories unrelated to images
    write_catalog(storage, "r1", vectors, noise_labels)
    result = train_head(load_settings(warehouse=warehouse), "r1",
                        HeadSettings(epochs=12, dim=8, holdout=0.25, seed=1), model_version=VERSION)
    assert not result.adopted and result.head_version is None
    decision = json.loads(storage.read_text(ADOPTED_KEY))
    assert decision["adopted"] is False and decision["metrics"]["raw_precision_at_k"] == result.raw_precision_at_k
    assert decision["reason"] and not storage.list("models/heads/synthetic")
    assert load_adopted_head(storage) is None


@pytest.mark.s3
def test_train_head_on_an_s3_warehouse(s3_bucket):
    bucket, s3 = s3_bucket
    storage = S3Storage(bucket, "wh", s3)
    vectors, categories = drowned_categories()
    write_catalog(storage, "r1", vectors, categories)
    settings = load_settings(warehouse=f"s3://{bucket}/wh", s3={"endpoint_url": s3.endpoint_url})
    result = train_head(settings, "r1", HeadSettings(epochs=12, dim=8, holdout=0.25, seed=1), model_version=VERSION)
    assert result.adopted and storage.exists(f"models/heads/{result.head_version}/head.pt")
    assert load_adopted_head(storage)[1]["head_version"] == result.head_version
