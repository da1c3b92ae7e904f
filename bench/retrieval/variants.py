"""What would move recall: the same queries against embedding variants the pipeline can already express.

Each variant is a `ModelSpec` (preprocessing, pooling) embedded with `ImageEmbedder` (what the embed
stage maps over partitions), searched exactly (`IndexFlatIP` over the canonical images, hits mapped to
products as the snapshot's id maps do), optionally after PCA whitening fitted on the catalog with
`pipelines.embedding.fit_pca` (what `embed --pca-dim D` fits). The snapshot is not used for search here:
this isolates the vectors from the index. Queries are exactly run.py's (same seed, same files).

    nice -n 10 .venv/bin/python bench/retrieval/variants.py                      # 300 queries
    nice -n 10 .venv/bin/python bench/retrieval/variants.py --variants production whole-224

This is a benchmark: it prints numbers and never fails on them. Vectors are cached in --work-dir.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.retrieval.catalog import load_catalog  # noqa: E402
from bench.retrieval.run import K, make_queries, score, summarise  # noqa: E402

HERE = Path(__file__).resolve().parent


def autocontrast(data: bytes, thicken: bool = False) -> bytes:
    """Stretch levels so the darkest pixels go black (faint thin-line drawings become visible);
    `thicken`: also widen dark strokes by one pixel each side (3x3 minimum filter)."""
    from PIL import ImageFilter, ImageOps

    from bench.retrieval.queries import flatten_on_white

    image = ImageOps.autocontrast(flatten_on_white(Image.open(io.BytesIO(data))), cutoff=(0.2, 0))
    if thicken:
        image = image.filter(ImageFilter.MinFilter(3))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def variant_specs(base) -> dict:
    """name -> (ModelSpec, bytes transform applied to catalog and query images alike, or None);
    `base` is the snapshot's own spec. A transform stands for a preprocessing step the pipeline lacks."""
    pre = base.preprocessing
    return {
        "production": (base, None),                                            # resize 256, center crop 224, GeM p=3
        "avg-pool": (replace(base, pooling="avg"), None),
        "whole-224": (replace(base, preprocessing=replace(pre, resize_shorter=224)), None),  # no 12.5 % border cut
        "whole-288": (replace(base, preprocessing=replace(pre, resize_shorter=288, crop=288)), None),  # + pixels
        # framing="trim": the blank canvas around a drawing cut away, the drawing fitted whole
        "trim": (replace(base, preprocessing=replace(pre, framing="trim")), None),
        "autocontrast": (base, autocontrast),
        "autocontrast-thicken": (base, lambda data: autocontrast(data, thicken=True)),
    }


def embed_cached(spec, keyed_blobs: list[tuple[str, bytes]], cache: Path, label: str,
                 transform=None, transform_name: str = "") -> tuple[np.ndarray, float]:
    from pipelines.embed.embedder import ImageEmbedder
    from pipelines.embed.model import model_version

    digest = hashlib.sha256("\n".join(f"{key}:{hashlib.sha256(data).hexdigest()}"
                                      for key, data in keyed_blobs).encode()).hexdigest()[:16]
    prefix = f"variant-{transform_name}-" if transform else "variant-"
    path = cache / f"{prefix}{model_version(spec)}-{label}-{digest}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return stored["vectors"], float(stored["seconds"])
    embedder = ImageEmbedder(spec, "cpu")
    started = time.perf_counter()
    vectors = {}
    items = ((key, transform(data)) for key, data in keyed_blobs) if transform else iter(keyed_blobs)
    for batch in embedder.embed_images(items):
        vectors.update(zip(batch.embeddings["sha256"], batch.embeddings["vector"]))
        if len(batch.failures):
            raise SystemExit(f"decode failures: {batch.failures.to_dict('records')}")
    seconds = time.perf_counter() - started
    embedder.close()
    out = np.stack([vectors[key] for key, _ in keyed_blobs]).astype(np.float32)
    np.savez(path, vectors=out, seconds=seconds)
    return out, seconds


def family_lookalikes(catalog, prefix: str, sides=(100, 65, 50)) -> dict:
    """How alike the family's drawings are in plain pixels at query sizes: for each member, the
    highest grey-level correlation with any *other* member, both resized to side x side."""
    from bench.retrieval.queries import flatten_on_white

    rows = catalog.rows[catalog.rows["product_id"].str.startswith(prefix)].drop_duplicates("product_id")
    out = {"members": len(rows)}
    for side in sides:
        pixels = []
        for sha in rows["sha256"]:
            image = flatten_on_white(Image.open(io.BytesIO(catalog.blobs[sha]))).convert("L")
            flat = np.asarray(image.resize((side, side), Image.Resampling.LANCZOS), np.float64).ravel()
            flat -= flat.mean()
            pixels.append(flat / (np.linalg.norm(flat) + 1e-9))
        correlation = np.stack(pixels) @ np.stack(pixels).T
        np.fill_diagonal(correlation, -1)
        nearest = correlation.max(axis=1)
        out[f"{side}px"] = {"median_nearest_correlation": round(float(np.median(nearest)), 3),
                            "share_above_0.98": round(float((nearest > 0.98).mean()), 3),
                            "share_above_0.99": round(float((nearest > 0.99).mean()), 3)}
    return out


def exact_product_hits(base: np.ndarray, shas: list[str], queries: np.ndarray, products_of_vector: dict,
                       category_of: dict) -> list[list[dict]]:
    """Top-K unique products per query, as SnapshotClient ranks them (ties by product id)."""
    scores = queries @ base.T
    order = np.argsort(-scores, axis=1)[:, : 8 * K]
    out = []
    for row, ids in zip(scores, order):
        best: dict[str, dict] = {}
        for vector_id in ids:
            for product in products_of_vector[shas[vector_id]]:
                best.setdefault(product, {"product_id": product, "category": category_of[product],
                                          "score": float(row[vector_id]), "key": shas[vector_id]})
        out.append(sorted(best.values(), key=lambda hit: (-hit["score"], hit["product_id"]))[:K])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", default=f"file://{REPO}/warehouse")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=None, help="default: all")
    parser.add_argument("--family", default="shapes-star-", help="look-alike family reported apart ('' for none)")
    parser.add_argument("--pca-dims", type=int, nargs="*", default=[128, 256, 512])
    parser.add_argument("--work-dir", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "catalog-index-bench-retrieval")
    parser.add_argument("--output", type=Path, default=HERE / "VARIANTS.json")
    args = parser.parse_args()

    from pipelines.client import model_spec_from_manifest
    from pipelines.embed.embedder import apply_pca, fit_pca
    from pipelines.embed.model import model_version

    cache = args.work_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    catalog = load_catalog(args.warehouse, args.work_dir / "serving")
    queries = make_queries(catalog, args.queries, args.seed, args.work_dir / f"queries-seed{args.seed}-n{args.queries}")
    shas = sorted(catalog.products_of_vector)
    category_of = dict(zip(catalog.rows["product_id"], catalog.rows["category"]))
    in_family = np.array([bool(args.family) and q["product_id"].startswith(args.family) for q in queries])
    base_spec = model_spec_from_manifest(catalog.client.manifest["model"], catalog.client.root)
    specs = variant_specs(base_spec)
    names = args.variants or list(specs)

    lookalikes = family_lookalikes(catalog, args.family) if args.family else None
    if lookalikes:
        print(f"{args.family}* family: {lookalikes['members']} products; nearest other member's pixel correlation "
              "(median, share > 0.99): " + ", ".join(
                  f"{side} {v['median_nearest_correlation']:.3f} {v['share_above_0.99']:.0%}"
                  for side, v in lookalikes.items() if side != "members"))
    rows = []
    print(f"{len(queries)} queries ({in_family.sum()} of them in the family), {len(shas)} catalog vectors, exact search")
    print(f"{'variant':38} {'R@1':>7} {'R@10':>7} {'catP@10':>8} {'R@10 outside':>14} {'R@10 family':>11}  catalog s")
    for name in names:
        spec, transform = specs[name]
        base, seconds = embed_cached(spec, [(sha, catalog.blobs[sha]) for sha in shas], cache, "catalog",
                                     transform, name)
        query_vectors, _ = embed_cached(spec, [(q["path"], Path(q["path"]).read_bytes()) for q in queries],
                                        cache, f"queries-s{args.seed}", transform, name)
        options = [(name, base, query_vectors)]
        for dim in args.pca_dims:
            if dim < len(shas):
                pca = fit_pca(base, dim, whiten=True)
                options.append((f"{name} +pca-whiten {dim}", apply_pca(base, pca), apply_pca(query_vectors, pca)))
        for label, b, q in options:
            hits = exact_product_hits(b, shas, q, catalog.products_of_vector, category_of)
            per_query = [score(query, h, lambda hit: catalog.products_of_vector[hit["key"]])
                         for query, h in zip(queries, hits)]
            metrics = summarise(per_query)
            r10 = np.array([p["recall_at_10"] for p in per_query])
            metrics["recall_at_10_outside_family"] = round(float(r10[~in_family].mean()), 4)
            metrics["recall_at_10_family"] = round(float(r10[in_family].mean()), 4) if in_family.any() else None
            rows.append({"variant": label, "model_version": model_version(spec), "bytes_transform": name if transform
                         else None, "catalog_embed_seconds": round(seconds, 1), **metrics})
            print(f"{label:38} {metrics['recall_at_1']:>7.4f} {metrics['recall_at_10']:>7.4f} "
                  f"{metrics['category_precision_at_10']:>8.4f} {metrics['recall_at_10_outside_family']:>14.4f} "
                  f"{metrics['recall_at_10_family'] or 0:>11.4f}  {seconds:.0f}", flush=True)
    args.output.write_text(json.dumps({"queries": len(queries), "seed": args.seed, "family": args.family,
                                       "family_queries": int(in_family.sum()), "family_lookalikes": lookalikes,
                                       "snapshot_id": catalog.snapshot_id, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
