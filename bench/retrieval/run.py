"""End-to-end retrieval on the sample catalog: our published snapshot vs a plain PyTorch + exact search.

Queries are altered copies of catalog images (crop to 85-92 %, rotate up to 6 degrees, colour and
brightness jitter, downscale to 50-80 %, JPEG quality 70; see queries.py). Ours: the live snapshot
pulled from the warehouse and searched with `pipelines.client.SnapshotClient.search_images`, as a
serving team would. Baseline: baseline.py, on the same catalog images and the same query files.
Prints recall@1, recall@10 and category precision@10 for both, times as an aside, and writes
RESULTS.json plus a contact sheet of our misses.

This is a benchmark: it prints numbers and never fails on them.

    make run                                                      # once: builds ./warehouse
    nice -n 10 .venv/bin/python bench/retrieval/run.py            # 300 queries
    nice -n 10 .venv/bin/python bench/retrieval/run.py --quick    # 50 queries, a fast check
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.retrieval.catalog import Catalog, load_catalog, read_snapshot_vectors  # noqa: E402
from bench.retrieval.queries import alter_image  # noqa: E402

HERE = Path(__file__).resolve().parent
K = 10


# -- queries -----------------------------------------------------------------------------------------

def make_queries(catalog: Catalog, count: int, seed: int, directory: Path) -> list[dict]:
    """`count` distinct indexed products (seeded), one of each one's images altered into a JPEG file."""
    rng = random.Random(seed)
    by_product = {p: group for p, group in catalog.rows.groupby("product_id", sort=True)}
    products = sorted(by_product)
    picked = rng.sample(products, min(count, len(products)))
    directory.mkdir(parents=True, exist_ok=True)
    queries = []
    for number, product in enumerate(picked):
        row = by_product[product].iloc[rng.randrange(len(by_product[product]))]
        data, alteration = alter_image(catalog.blobs[row.sha256], random.Random(f"{seed}:{product}:{row.image_url}"))
        path = directory / f"{number:04d}.jpg"
        path.write_bytes(data)
        queries.append({"path": str(path), "product_id": product, "category": row.category,
                        "image_url": row.image_url, "sha256": row.sha256, "canonical_sha256": row.canonical_sha256,
                        "duplicate_kind": row.duplicate_kind, "alteration": alteration.to_json()})
    return queries


# -- scoring -----------------------------------------------------------------------------------------

def score(query: dict, hits: list[dict], products_of_hit) -> dict:
    """Per-query figures from a best-first list of unique products (dicts: product_id, category, score, key).

    A vector can stand for several products (exact or near duplicates share one vector), and those
    products then tie. So besides the strict figures, a hit counts when the queried product is among
    the products of the hit's vector: `products_of_hit(hit)`.
    """
    top = hits[:K]
    target = query["product_id"]
    ids = [hit["product_id"] for hit in top]
    rank = ids.index(target) + 1 if target in ids else None
    covered_rank = next((i + 1 for i, hit in enumerate(top) if target in products_of_hit(hit)), None)
    return {
        "rank": rank,
        "recall_at_1_strict": rank == 1,
        "recall_at_10_strict": rank is not None,
        "recall_at_1": bool(top) and target in products_of_hit(top[0]),
        "recall_at_10": covered_rank is not None,
        "category_precision_at_10": sum(hit["category"] == query["category"] for hit in top) / K,
    }


def summarise(per_query: list[dict]) -> dict:
    keys = ["recall_at_1", "recall_at_10", "category_precision_at_10", "recall_at_1_strict", "recall_at_10_strict"]
    if not per_query:
        return {key: None for key in keys}
    return {key: round(float(np.mean([q[key] for q in per_query])), 4) for key in keys}


def breakdown(queries: list[dict], per_query: list[dict], family: str) -> dict:
    """Metrics per category, and inside / outside the look-alike family (product ids starting with `family`)."""
    out = {"by_category": {}}
    for category in sorted({q["category"] for q in queries}):
        picked = [s for q, s in zip(queries, per_query) if q["category"] == category]
        out["by_category"][category] = dict(summarise(picked), queries=len(picked))
    if family:
        inside = [s for q, s in zip(queries, per_query) if q["product_id"].startswith(family)]
        outside = [s for q, s in zip(queries, per_query) if not q["product_id"].startswith(family)]
        out["family"] = dict(summarise(inside), queries=len(inside), prefix=family)
        out["outside_family"] = dict(summarise(outside), queries=len(outside))
    return out


def paired(ours: list[dict], baseline: list[dict], key: str) -> dict:
    """Queries only one side gets right: the difference in `key` is (ours_only - baseline_only) / n."""
    return {"ours_only": sum(o[key] and not b[key] for o, b in zip(ours, baseline)),
            "baseline_only": sum(b[key] and not o[key] for o, b in zip(ours, baseline))}


# -- the two systems ---------------------------------------------------------------------------------

def run_ours(catalog: Catalog, queries: list[dict]) -> tuple[list[list[dict]], float]:
    catalog.client.search_images([queries[0]["path"]], k=K)  # warm-up, untimed: model load, first batch
    started = time.perf_counter()
    results = catalog.client.search_images([q["path"] for q in queries], k=K)
    seconds = time.perf_counter() - started
    hits = []
    for query, result in zip(queries, results):
        if result.error:
            raise SystemExit(f"query {query['path']} failed: {result.error}")
        hits.append([{"product_id": h.product_id, "category": h.category, "score": h.score, "key": h.sha256}
                     for h in result.results])
    return hits, seconds


def time_ours_catalog(catalog: Catalog, cache: Path, use_cache: bool) -> dict:
    """Embed the indexed (canonical) images with the embedder the embed stage maps over partitions."""
    from pipelines.client import model_spec_from_manifest
    from pipelines.embed.embedder import ImageEmbedder

    shas = sorted(set(catalog.rows["canonical_sha256"]))
    key = hashlib.sha256(("ours\n" + catalog.client.manifest["model"]["version"] + "\n" + "\n".join(shas)).encode())
    marker = cache / f"ours-catalog-{key.hexdigest()[:16]}.json"
    if use_cache and marker.is_file():
        return dict(json.loads(marker.read_text()), cached=True)
    spec = model_spec_from_manifest(catalog.client.manifest["model"], catalog.client.root)
    embedder = ImageEmbedder(spec, "cpu")
    started = time.perf_counter()
    for _ in embedder.embed_images((sha, catalog.blobs[sha]) for sha in shas):
        pass
    timing = {"images": len(shas), "seconds": round(time.perf_counter() - started, 2)}
    embedder.close()
    marker.write_text(json.dumps(timing))
    return dict(timing, cached=False)


def run_baseline(catalog: Catalog, queries: list[dict], cache: Path, use_cache: bool, cores: int):
    import torch

    from bench.retrieval.baseline import DESCRIPTION, ExactProductSearch, PlainEmbedder

    torch.set_num_threads(cores)
    shas = sorted(set(catalog.rows["sha256"]))  # every distinct catalog image, duplicates included
    key = hashlib.sha256(("baseline\n" + DESCRIPTION + "\n" + "\n".join(shas)).encode()).hexdigest()[:16]
    vectors_file, timing_file = cache / f"baseline-catalog-{key}.npy", cache / f"baseline-catalog-{key}.json"
    embedder = PlainEmbedder()
    if use_cache and vectors_file.is_file() and timing_file.is_file():
        vectors, catalog_timing = np.load(vectors_file), dict(json.loads(timing_file.read_text()), cached=True)
    else:
        started = time.perf_counter()
        vectors = embedder.embed([catalog.blobs[sha] for sha in shas])
        catalog_timing = {"images": len(shas), "seconds": round(time.perf_counter() - started, 2)}
        np.save(vectors_file, vectors)
        timing_file.write_text(json.dumps(catalog_timing))
        catalog_timing["cached"] = False
    products = catalog.rows.drop_duplicates(["sha256", "product_id"]).groupby("sha256")
    products_of = {sha: [(r.product_id, r.category) for r in group.itertuples()] for sha, group in products}
    search = ExactProductSearch(vectors, [products_of[sha] for sha in shas])

    embedder.embed([Path(queries[0]["path"]).read_bytes()])  # warm-up, untimed, as for ours
    started = time.perf_counter()
    query_vectors = embedder.embed([Path(q["path"]).read_bytes() for q in queries])
    found = search.search(query_vectors, K)
    query_seconds = time.perf_counter() - started
    hits = [[dict(hit, key=shas[hit["vector_id"]]) for hit in row] for row in found]
    return hits, {"catalog": catalog_timing, "queries": {"images": len(queries), "seconds": round(query_seconds, 2)}}, \
        {sha: [p for p, _ in products_of[sha]] for sha in shas}


# -- diagnosis ---------------------------------------------------------------------------------------

def diagnose_ours(catalog: Catalog, warehouse: str, queries: list[dict]) -> list[dict]:
    """Per query: where the queried product's own vector ranks in an exact search over every indexed
    vector, and its cosine, next to the best cosine; tells index misses from embedding misses."""
    from pipelines.client import embed_query_images

    shas = sorted(catalog.products_of_vector)
    base = read_snapshot_vectors(warehouse, catalog.client.manifest["model"]["version"], shas)
    vectors, errors = embed_query_images([q["path"] for q in queries], catalog.client.manifest["model"],
                                         catalog.client.root)
    if errors:
        raise SystemExit(f"query embedding failed: {errors}")
    scores = vectors @ base.T
    out = []
    for query, row in zip(queries, scores):
        own = [i for i, sha in enumerate(shas) if query["product_id"] in catalog.products_of_vector[sha]]
        best_own = max(own, key=lambda i: row[i])
        out.append({"own_cosine": round(float(row[best_own]), 4), "top_cosine": round(float(row.max()), 4),
                    "own_exact_rank": int((row > row[best_own]).sum()) + 1})
    return out


def contact_sheet(catalog: Catalog, queries: list[dict], hits: list[list[dict]], picks: list[int], path: Path,
                  shown: int = 5, cell: int = 128) -> None:
    """One row per miss: catalog image | query | our top `shown` hits (product id without its category
    prefix, category, score); the queried product in green."""
    from PIL import Image, ImageDraw

    from bench.retrieval.queries import flatten_on_white

    label_h = 30
    sheet = Image.new("RGB", ((2 + shown) * cell, max(1, len(picks)) * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)

    def thumb(data: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (cell * 2, cell * 2))
        image = flatten_on_white(image)
        image.thumbnail((cell - 4, cell - 4))
        return image

    for row, index in enumerate(picks):
        query, y = queries[index], row * (cell + label_h)
        cells = [(catalog.blobs[query["sha256"]], query["product_id"], query["category"]),
                 (Path(query["path"]).read_bytes(), f"query {Path(query['path']).name}", "altered copy")]
        cells += [(catalog.blobs[hit["key"]], hit["product_id"], f"{hit['category']} {hit['score']:.3f}")
                  for hit in hits[index][:shown]]
        for column, (data, line1, line2) in enumerate(cells):
            image = thumb(data)
            x = column * cell
            sheet.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
            colour = "green" if column >= 2 and line1 == query["product_id"] else "black"
            name = line1.split("-", 1)[1] if "-" in line1 and not line1.startswith("query") else line1  # category is below
            draw.text((x + 2, y + cell), name[:21], fill=colour)
            draw.text((x + 2, y + cell + 12), line2[:21], fill="gray")
        draw.line([(0, y + cell + label_h - 1), (sheet.width, y + cell + label_h - 1)], fill="lightgray")
    sheet.quantize(256).save(path, optimize=True)  # a palette keeps the sheet small enough to commit


# -- main ------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warehouse", default=f"file://{REPO}/warehouse",
                        help="warehouse with a published snapshot (default: the one `make run` builds)")
    parser.add_argument("--index-name", default="catalog")
    parser.add_argument("--queries", type=int, default=300, help="distinct products queried (default 300)")
    parser.add_argument("--quick", action="store_true", help="50 queries; results under --work-dir, not bench/")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work-dir", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "catalog-index-bench-retrieval",
                        help="pulled snapshot, query files and cached baseline vectors")
    parser.add_argument("--no-cache", action="store_true", help="re-embed the catalog for both timings")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--family", default="shapes-star-",
                        help="product-id prefix of a look-alike family reported apart (the sample's 171 generated "
                             "star polygons); '' for none")
    parser.add_argument("--output", type=Path, default=None,
                        help="RESULTS.json path (default bench/retrieval/RESULTS.json; with --quick, in --work-dir)")
    args = parser.parse_args()
    if args.quick:
        args.queries = 50
    output = args.output or ((args.work_dir / "RESULTS-quick.json") if args.quick else HERE / "RESULTS.json")
    cache = args.work_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    catalog = load_catalog(args.warehouse, args.work_dir / "serving", args.index_name)
    queries = make_queries(catalog, args.queries, args.seed, args.work_dir / f"queries-seed{args.seed}-n{args.queries}")
    print(f"snapshot {catalog.snapshot_id} (run {catalog.source_run_id}): {len(catalog.products_of_vector)} vectors, "
          f"{catalog.rows['product_id'].nunique()} products, {len(catalog.rows)} catalog images; "
          f"{len(queries)} queries (seed {args.seed})", flush=True)

    ours_hits, ours_query_seconds = run_ours(catalog, queries)
    ours_scores = [score(q, h, lambda hit: catalog.products_of_vector[hit["key"]]) for q, h in zip(queries, ours_hits)]
    diagnosis = diagnose_ours(catalog, args.warehouse, queries)
    ours_catalog = time_ours_catalog(catalog, cache, not args.no_cache)

    systems = {"ours": {"metrics": summarise(ours_scores), "timing": {
        "catalog": ours_catalog, "queries": {"images": len(queries), "seconds": round(ours_query_seconds, 2)}},
        "description": f"snapshot {catalog.snapshot_id}, model {catalog.client.manifest['model']['version']} "
                       f"({catalog.client.manifest['model']['pooling']} pooling), "
                       + ", ".join(sorted({s.kind for s in catalog.client.shards})) + " shards, "
                       "SnapshotClient.search_images"}}
    base_scores = None
    if not args.skip_baseline:
        from bench.retrieval.baseline import DESCRIPTION

        base_hits, base_timing, base_products = run_baseline(catalog, queries, cache, not args.no_cache, args.cores)
        base_scores = [score(q, h, lambda hit: base_products[hit["key"]]) for q, h in zip(queries, base_hits)]
        systems["baseline"] = {"metrics": summarise(base_scores), "timing": base_timing, "description": DESCRIPTION}

    print()
    print(f"{'':10} {'recall@1':>9} {'recall@10':>10} {'cat P@10':>9} {'R@1 strict':>11} {'R@10 strict':>12}"
          f"   {'embed catalog':>16} {'embed+search queries':>21}")
    for name, system in systems.items():
        m, t = system["metrics"], system["timing"]
        cat = f"{t['catalog']['seconds']:.0f}s/{t['catalog']['images']}" + (" (c)" if t["catalog"]["cached"] else "")
        print(f"{name:10} {m['recall_at_1']:>9.4f} {m['recall_at_10']:>10.4f} {m['category_precision_at_10']:>9.4f} "
              f"{m['recall_at_1_strict']:>11.4f} {m['recall_at_10_strict']:>12.4f}   {cat:>16} "
              f"{t['queries']['seconds']:>16.1f}s/{t['queries']['images']}")
    if any(system["timing"]["catalog"]["cached"] for system in systems.values()):
        print("(c): catalog time measured by an earlier run with the same images (cached); --no-cache to redo")
    all_scores = {"ours": ours_scores, "baseline": base_scores}
    for name, system in systems.items():
        system.update(breakdown(queries, all_scores[name], args.family))
    if args.family:
        print(f"\nsplit by the look-alike family {args.family}* (R@1 / R@10 / cat P@10):")
        for name, system in systems.items():
            inside, outside = system["family"], system["outside_family"]
            fmt = lambda m: (f"{m['recall_at_1']:.4f} / {m['recall_at_10']:.4f} / "  # noqa: E731
                             f"{m['category_precision_at_10']:.4f}" if m["queries"] else "-")
            print(f"  {name:10} family ({inside['queries']} queries) {fmt(inside)}    "
                  f"everything else ({outside['queries']} queries) {fmt(outside)}")
    if base_scores:
        comparison = {key: paired(ours_scores, base_scores, key) for key in ("recall_at_1", "recall_at_10")}
        print("queries only one side gets right: " + ", ".join(
            f"{key} ours {c['ours_only']} / baseline {c['baseline_only']}" for key, c in comparison.items()))
        systems["ours"]["paired_vs_baseline"] = comparison

    ours_m = systems["ours"]["metrics"]
    goals = {"recall_at_10_ge_0.99": ours_m["recall_at_10"] >= 0.99}
    if "baseline" in systems:
        goals["recall_at_1_above_baseline"] = ours_m["recall_at_1"] > systems["baseline"]["metrics"]["recall_at_1"]
    print("goals:", ", ".join(f"{name} {'MET' if ok else 'NOT MET'}" for name, ok in goals.items()))

    misses = [i for i, s in enumerate(ours_scores) if not s["recall_at_1"]]
    misses.sort(key=lambda i: (ours_scores[i]["recall_at_10"], diagnosis[i]["own_cosine"]))
    in_family = lambda i: bool(args.family) and queries[i]["product_id"].startswith(args.family)  # noqa: E731
    failures = []
    for i in misses:
        failures.append({"query": Path(queries[i]["path"]).name, **{k: queries[i][k] for k in (
            "product_id", "category", "image_url", "duplicate_kind", "alteration")}, "in_family": in_family(i),
            "ours": {**ours_scores[i], **diagnosis[i], "top": [{k: hit[k] for k in ("product_id", "category", "score")}
                                                             for hit in ours_hits[i][:3]]},
            "baseline": base_scores[i] if base_scores else None})
    if misses:
        family_misses = [f for f in failures if f["in_family"]]
        print(f"\nour recall@1 misses: {len(misses)}, of them {len(family_misses)} in the family "
              f"({sum(not f['ours']['recall_at_10'] for f in family_misses)} not even in the top 10). "
              "Query product -> our top hit (cosine); own image's cosine and exact rank among all vectors:")
        listed = [f for f in failures if not f["in_family"]] + family_misses[:5]
        for f in listed:
            top = f["ours"]["top"][0]
            print(f"  {f['query']} {f['product_id']:<40} -> {top['product_id']:<40} ({top['score']:.3f}); own "
                  f"{f['ours']['own_cosine']:.3f} rank {f['ours']['own_exact_rank']}"
                  + ("" if f["ours"]["recall_at_10"] else "  [not in top 10]"))
        if len(family_misses) > 5:
            print(f"  … and {len(family_misses) - 5} more in the family (RESULTS.json lists all)")
    sheet = output.with_name(output.stem.replace("RESULTS", "failures") + ".png")
    if misses:
        # every miss outside the look-alike family first (they are few), then family members
        shown = [i for i in misses if not in_family(i)][:6]
        shown += [i for i in misses if in_family(i)][: 10 - len(shown)]
        contact_sheet(catalog, queries, ours_hits, shown, sheet)
        print(f"contact sheet of our misses: {sheet}")

    both_miss = sum(1 for i in misses if base_scores and not base_scores[i]["recall_at_1"])
    result = {"snapshot_id": catalog.snapshot_id, "source_run_id": catalog.source_run_id, "warehouse": args.warehouse,
              "queries": len(queries), "seed": args.seed, "k": K, "cores": args.cores,
              "catalog": {"vectors": len(catalog.products_of_vector), "products": int(catalog.rows["product_id"].nunique()),
                          "images": len(catalog.rows), "distinct_images": int(catalog.rows["sha256"].nunique())},
              "systems": systems, "goals": goals, "ours_recall_at_1_misses_also_missed_by_baseline": both_miss,
              "ours_failures": failures, "failures_png": str(sheet) if misses else None}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
