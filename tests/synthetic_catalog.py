"""A synthetic catalog for the index tests: DEDUP_IMAGES + EMBEDDINGS tables with clustered vectors.

Vectors are L2-normalised points around per-category cluster centres (a few clusters per
category), so nearest neighbours are mostly within a category, like real catalog embeddings.
Some products share an image (the same canonical sha256), as dedup output does.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from pipelines.layout import dedup_images_key, embeddings_prefix
from pipelines.storage import Storage
from schemas.tables import DEDUP_IMAGES, EMBEDDINGS

MODEL = {"name": "unknown", "version": "test-model-v1", "weights_sha256": None, "preprocessing": None, "dim": None}


def clustered_vectors(count: int, dim: int, clusters: int, rng: np.random.Generator, spread: float = 0.35) -> np.ndarray:
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(0, clusters, count)
    points = centres[labels] + spread * rng.standard_normal((count, dim)).astype(np.float32) / np.sqrt(dim) * 4
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def sha_of(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def write_catalog(storage: Storage, run_id: str, per_category: dict[str, int], *, dim: int = 32, seed: int = 0,
                  model_version: str = MODEL["version"], shared_every: int = 10, embed_part_rows: int = 700,
                  missing: int = 0, changed: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """Write dedup/<run_id>/images.parquet and embeddings/<model_version>/part-*.parquet.

    Every `shared_every`-th product reuses the previous product's image (an exact duplicate).
    `missing` canonical images get no vector (as if the embed stage quarantined them).
    `changed` = {category: salt}: those categories get new images and vectors (a re-crawled category);
    every other category's images and vectors are the same as in any other call with the same seed.
    Returns {sha256: vector}.
    """
    rng = np.random.default_rng(seed)
    rows, vectors = [], {}
    now = datetime(2026, 11, 23, 3, 0, tzinfo=timezone.utc)
    for category, count in sorted(per_category.items()):
        salt = (changed or {}).get(category, "")
        category_rng = np.random.default_rng(int(sha_of(f"{category}/{seed}/{salt}")[:8], 16))
        points = clustered_vectors(count, dim, clusters=max(2, count // 60), rng=category_rng)
        previous_sha = None
        for number in range(count):
            product = f"{category}-{number:05d}"
            if previous_sha is not None and number % shared_every == 0:
                sha = previous_sha  # this product's picture is byte-identical to the previous one's
            else:
                sha = sha_of(f"{category}/{number}/{salt}")
                vectors[sha] = points[number]
            rows.append({"product_id": product, "category": category,
                         "image_url": f"http://img.example/{category}/{number}.png", "title": f"{category} #{number}",
                         "sha256": sha, "phash": "0" * 16, "width": 64, "height": 64, "fetched_at": now,
                         "cluster_id": sha, "canonical_sha256": sha, "is_canonical": True,
                         "duplicate_kind": "none", "run_id": run_id})
            previous_sha = sha
    storage.write_table(dedup_images_key(run_id), pa.Table.from_pylist(rows, schema=DEDUP_IMAGES))
    items = list(vectors.items())
    if missing:
        items = items[missing:]
    order = rng.permutation(len(items))  # the cache is in embedding order, not category order
    items = [items[i] for i in order]
    storage.delete_prefix(embeddings_prefix(model_version))
    for part, start in enumerate(range(0, len(items), embed_part_rows)):
        chunk = items[start:start + embed_part_rows]
        table = pa.Table.from_pylist([{"sha256": sha, "vector": vector.tolist(), "model_version": model_version,
                                       "run_id": run_id, "embedded_at": now} for sha, vector in chunk],
                                     schema=EMBEDDINGS)
        storage.write_table(f"{embeddings_prefix(model_version)}part-{part:05d}.parquet", table)
    return vectors
