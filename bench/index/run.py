"""bench/index: this project's index build vs autofaiss on the same vectors and the same memory budget.

    nice -n 10 .venv/bin/python bench/index/run.py --vectors 1000000 --dim 1280 --budget-mb 5632 \
        --catalog-warehouse file://$PWD/warehouse

The same vectors for both: synthetic clustered, L2-normalised float32 (plus the sample catalog's
embeddings with --catalog-warehouse). autofaiss reads them as .npy files; ours reads them as the
embed stage leaves them, a warehouse with a dedup table and `embeddings/<version>/part-*.parquet`,
and runs `build_index` itself (plan shards, read each shard's vectors, build, tune, check, write
shard files and id maps), the shards one after another in one process (`--single-shard`: only
`build_shard` on the whole base). Both get the same index memory budget (autofaiss:
max_index_memory_usage; ours: index.memory_budget_mb). Each builder runs in its own process
(autofaiss from its own virtualenv, bench/.venv-autofaiss, because it needs an old pyarrow),
timed end to end, with its peak RSS from the kernel (wait4 ru_maxrss). Then this process loads
both results with the same faiss, applies each builder's own search parameters (ours: per shard,
results merged by score as the client does) and measures recall@10 against exact search on
held-out queries (and on catalog vectors used as queries), and queries per second (batch search).

Numbers, not pass/fail. Results go to stdout and bench/index/results/<label>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
AUTOFAISS_PYTHON = REPO / "bench" / ".venv-autofaiss" / "bin" / "python"
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------

LATENT_DIM = 24


def cluster_structure(seed: int, clusters: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres, per-cluster 24-dim subspaces and spreads: shared by the base and the queries."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = rng.standard_normal((clusters, LATENT_DIM, dim)).astype(np.float32) / np.sqrt(dim)
    scales = rng.uniform(0.6, 1.4, clusters).astype(np.float32)
    return centres, bases, scales


def clustered_points(structure, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, cluster labels): clustered vectors with a low intrinsic dimension, like CNN features:
    a cluster centre plus a point of the cluster's 24-dim subspace plus small isotropic noise, L2-normalised."""
    centres, bases, scales = structure
    dim = centres.shape[1]
    labels = rng.integers(0, len(centres), count)
    latent = rng.standard_normal((count, LATENT_DIM)).astype(np.float32) * scales[labels, None]
    points = centres[labels].copy()
    for cluster in np.unique(labels):  # per cluster: no (count, 24, dim) temporary
        members = labels == cluster
        points[members] += (latent[members] @ bases[cluster]) * 0.25  # ~1.2 from the centre: neighbours spill over IVF cells
    points += rng.standard_normal((count, dim)).astype(np.float32) * (0.25 / np.sqrt(dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32), labels


def generate(path: Path, labels_path: Path, structure, rng: np.random.Generator, count: int,
             chunk: int = 20_000) -> None:
    """Write `count` points chunk by chunk (1M x 1280 needs one chunk of RAM, not 5 GB), and their clusters."""
    dim = structure[0].shape[1]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    labels = np.empty(count, dtype=np.int32)
    for start in range(0, count, chunk):
        stop = start + min(chunk, count - start)
        out[start:stop], labels[start:stop] = clustered_points(structure, rng, stop - start)
    out.flush()
    del out
    np.save(labels_path, labels)


def catalog_vectors(warehouse: str | None, dim: int) -> tuple[np.ndarray, list[str], list[str]] | None:
    """(vectors, sha256s, categories) of the sample catalog's indexed images, when a warehouse has
    embeddings of dimension `dim` (`make run` writes them): one row per canonical image."""
    if not warehouse:
        return None
    from pipelines.index.stage import latest_dedup_run, read_dedup_members
    from pipelines.storage import open_storage

    storage = open_storage(warehouse)
    for version in reversed(storage.list_dirs("embeddings")):
        table = storage.read_table(f"embeddings/{version}/", columns=["sha256", "vector"])
        if table.num_rows and len(table.column("vector")[0]) == dim:
            break
    else:
        print(f"no {dim}-d embeddings under {warehouse}/embeddings: synthetic vectors only")
        return None
    members = read_dedup_members(storage, latest_dedup_run(storage))
    category: dict[str, str] = {}
    for sha, name in zip(members.column("sha256").to_pylist(), members.column("category").to_pylist()):
        category.setdefault(sha, name)  # an image in two categories is indexed here once
    shas = table.column("sha256").to_pylist()
    rows, seen = [], set()
    for row, sha in enumerate(shas):  # indexed images only, one row each
        if sha in category and sha not in seen:
            seen.add(sha)
            rows.append(row)
    vectors = np.array(table.take(rows).column("vector").to_pylist(), dtype=np.float32)
    kept = [shas[row] for row in rows]
    print(f"sample catalog: {len(vectors):,} indexed images of model {version}, "
          f"{len({category[sha] for sha in kept})} categories")
    return vectors, kept, [category[sha] for sha in kept]


@dataclass
class BenchData:
    base_dir: Path                 # the *.npy files both builders index, in global id order
    count: int
    dim: int
    labels: np.ndarray             # synthetic rows: cluster; catalog rows: -1
    catalog_shas: list[str]
    catalog_categories: list[str]
    queries: np.ndarray            # held-out synthetic queries (never indexed)
    truth: np.ndarray              # their exact top-10 ids
    catalog_query_ids: np.ndarray  # catalog vectors used as queries (they are in the base)
    catalog_truth: np.ndarray      # their exact top-11 ids (the query itself is dropped when scoring)


def prepare(work: Path, args) -> BenchData:
    """Vectors, queries and exact neighbours, cached by parameters: the synthetic base is generated
    once per size and shared (hard link) by the runs with and without the catalog."""
    synthetic_key = f"n{args.vectors}-d{args.dim}-c{args.clusters}-s{args.seed}"
    synthetic = work / synthetic_key / "embeddings" / "base.npy"
    labels_path = work / synthetic_key / "labels.npy"
    structure = cluster_structure(args.seed, args.clusters, args.dim)
    if not (synthetic.exists() and labels_path.exists()):
        synthetic.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        generate(synthetic, labels_path, structure, np.random.default_rng(args.seed + 1), args.vectors)
        print(f"generated {args.vectors:,} x {args.dim} vectors in {time.perf_counter() - started:.0f}s", flush=True)
    folder = work / (synthetic_key + ("-catalog" if args.catalog_warehouse else ""))
    base_dir = folder / "embeddings"           # autofaiss reads every .npy of a folder
    if folder != synthetic.parents[1] and not (base_dir / "base.npy").exists():
        base_dir.mkdir(parents=True, exist_ok=True)
        os.link(synthetic, base_dir / "base.npy")
    catalog_path, catalog_meta = base_dir / "catalog.npy", folder / "catalog.json"
    if args.catalog_warehouse and not catalog_path.exists():
        found = catalog_vectors(args.catalog_warehouse, args.dim)
        if found is None:
            raise SystemExit(f"--catalog-warehouse {args.catalog_warehouse}: no {args.dim}-d embeddings there; "
                             "run `make run` first (or leave the flag out)")
        vectors, shas, categories = found
        np.save(catalog_path, vectors)
        catalog_meta.write_text(json.dumps({"sha256": shas, "category": categories}))
    meta = json.loads(catalog_meta.read_text()) if catalog_path.exists() else {"sha256": [], "category": []}
    labels = np.concatenate([np.load(labels_path), np.full(len(meta["sha256"]), -1, dtype=np.int32)])

    queries_path, truth_path = folder / "queries.npy", folder / "truth.npy"
    catalog_queries_path, catalog_truth_path = folder / "catalog_queries.npy", folder / "catalog_truth.npy"
    if not (queries_path.exists() and truth_path.exists() and catalog_truth_path.exists()):
        # Held-out queries: new points of the same clusters, never indexed.
        queries, _ = clustered_points(structure, np.random.default_rng(args.seed + 2), args.queries)
        catalog_ids = np.arange(args.vectors, args.vectors + len(meta["sha256"]))
        catalog_ids = np.sort(np.random.default_rng(args.seed + 3).permutation(catalog_ids)[:args.catalog_queries])
        print(f"exact top-10 of {len(queries):,} held-out queries and {len(catalog_ids):,} catalog queries...",
              flush=True)
        started = time.perf_counter()
        truth = exact_truth(base_dir, queries)
        catalog_truth = (exact_truth(base_dir, np.load(catalog_path)[catalog_ids - args.vectors], k=11)
                         if len(catalog_ids) else np.empty((0, 11), dtype=np.int64))
        np.save(queries_path, queries)
        np.save(truth_path, truth)
        np.save(catalog_queries_path, catalog_ids)
        np.save(catalog_truth_path, catalog_truth)
        print(f"exact search: {time.perf_counter() - started:.0f}s", flush=True)
    return BenchData(base_dir, len(labels), args.dim, labels, meta["sha256"], meta["category"],
                     np.load(queries_path), np.load(truth_path), np.load(catalog_queries_path),
                     np.load(catalog_truth_path))


def base_files(base_dir: Path) -> list[Path]:
    return sorted(base_dir.glob("*.npy"))


def exact_truth(base_dir: Path, queries: np.ndarray, k: int = 10) -> np.ndarray:
    from pipelines.index.vectors import FileVectors, exact_top_k

    offset, scores_all, ids_all = 0, [], []
    for path in base_files(base_dir):
        source = FileVectors.open_npy(path)
        scores, ids = exact_top_k(source, queries, k)
        scores_all.append(scores)
        ids_all.append(ids + offset)
        offset += source.count
    scores, ids = np.hstack(scores_all), np.hstack(ids_all)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1)


# ------------------------------------------------------------------------------------------
# the bench vectors as a warehouse: what `catalog-index build-index` reads
# ------------------------------------------------------------------------------------------

BENCH_RUN_ID = "20261123T000000Z"
BENCH_MODEL = {"name": "bench-synthetic", "version": "bench-synthetic-v1", "weights_sha256": None,
               "preprocessing": None}
SYNTHETIC_CATEGORIES = 20
EMBED_PART_ROWS = 1000  # embed.images_per_task: one embeddings part per embed task


def synthetic_sha256(row: int) -> str:
    return hashlib.sha256(f"bench/{row}".encode()).hexdigest()


def row_shas(data: BenchData) -> list[str]:
    synthetic = data.count - len(data.catalog_shas)
    return [synthetic_sha256(row) for row in range(synthetic)] + list(data.catalog_shas)


def row_categories(data: BenchData) -> list[str]:
    synthetic = data.labels[:data.count - len(data.catalog_shas)]
    return [f"synthetic-{c:02d}" for c in (synthetic % SYNTHETIC_CATEGORIES)] + list(data.catalog_categories)


def write_warehouse(data: BenchData, root: Path) -> str:
    """A file:// warehouse holding the bench vectors as the embed stage leaves them: a dedup table
    (one product per image; synthetic images get 20 categories by cluster, catalog images keep
    theirs) and `embeddings/<version>/part-*.parquet` of 1,000 vectors each in sha256 order, as embed
    tasks write them, so every part holds vectors of every category. Written once, not timed."""
    import pyarrow as pa

    from pipelines.storage import open_storage
    from schemas.tables import DEDUP_IMAGES, EMBEDDINGS

    uri = root.resolve().as_uri()
    done = root / "_bench_ready"
    if done.exists():
        return uri
    started = time.perf_counter()
    storage = open_storage(uri)
    shas, categories = row_shas(data), row_categories(data)
    n = len(shas)
    now = pa.scalar(datetime(2026, 11, 23, tzinfo=timezone.utc), type=DEDUP_IMAGES.field("fetched_at").type)
    products = [f"p{row:07d}" for row in range(n)]
    dedup = pa.table({
        "product_id": products, "category": categories,
        "image_url": [f"http://img.example/{p}.jpg" for p in products], "title": products, "sha256": shas,
        "phash": pa.nulls(n, pa.string()), "width": pa.nulls(n, pa.int32()), "height": pa.nulls(n, pa.int32()),
        "fetched_at": pa.array([now.as_py()] * n, DEDUP_IMAGES.field("fetched_at").type),
        "cluster_id": shas, "canonical_sha256": shas, "is_canonical": pa.array([True] * n),
        "duplicate_kind": ["none"] * n, "run_id": [BENCH_RUN_ID] * n}, schema=DEDUP_IMAGES)
    storage.write_table(f"dedup/{BENCH_RUN_ID}/images.parquet", dedup)
    del dedup

    arrays = [np.load(path, mmap_mode="r") for path in base_files(data.base_dir)]
    offsets = np.cumsum([0] + [len(a) for a in arrays])
    order = np.argsort(np.array(shas))
    prefix = f"embeddings/{BENCH_MODEL['version']}/"
    for part, start in enumerate(range(0, n, EMBED_PART_ROWS)):
        rows = np.sort(order[start:start + EMBED_PART_ROWS])  # disk order inside a part
        vectors = np.empty((len(rows), data.dim), dtype=np.float32)
        for which, array in enumerate(arrays):
            mine = (rows >= offsets[which]) & (rows < offsets[which + 1])
            vectors[mine] = array[rows[mine] - offsets[which]]
        flat = pa.array(vectors.reshape(-1))
        table = pa.table({
            "sha256": [shas[r] for r in rows],
            "vector": pa.ListArray.from_arrays(pa.array(np.arange(0, len(flat) + 1, data.dim, dtype=np.int32)),
                                               flat),
            "model_version": [BENCH_MODEL["version"]] * len(rows), "run_id": [BENCH_RUN_ID] * len(rows),
            "embedded_at": pa.array([now.as_py()] * len(rows), EMBEDDINGS.field("embedded_at").type)},
            schema=EMBEDDINGS)
        storage.write_table(f"{prefix}part-{BENCH_RUN_ID}-{part:05d}.parquet", table)
    done.write_text("ok")
    print(f"wrote the bench warehouse {uri} ({n:,} images) in {time.perf_counter() - started:.0f}s", flush=True)
    return uri


# ------------------------------------------------------------------------------------------
# builders (each in its own process)
# ------------------------------------------------------------------------------------------

def build_ours_sharded(warehouse: str, out: str, budget_mb: int, max_vectors_per_shard: int) -> None:
    """Child process: `catalog-index build-index` on the bench warehouse. The local runner builds the
    shards one after another in this process, each with every core: the code each Spark shard task
    runs (plan, read the shard's vectors from the embeddings Parquet, train, add, tune, check, write
    the shard file and id map), minus Spark."""
    from pipelines.config import load_settings
    from pipelines.config import IndexSettings
    from pipelines.index import build_index

    settings = load_settings(warehouse=warehouse)
    cfg = IndexSettings(memory_budget_mb=budget_mb, max_vectors_per_shard=max_vectors_per_shard)
    result = build_index(settings, BENCH_RUN_ID, model=BENCH_MODEL, cfg=cfg, runner="local")
    keep = ("shard_id", "categories", "index_type", "faiss_factory", "search_params", "vectors", "recall_at_10",
            "train_vectors", "estimated_memory_bytes", "build_seconds", "files", "tuning")
    Path(out + ".json").write_text(json.dumps({
        "snapshot_id": result.snapshot_id, "index_name": result.index_name, "build_seconds": result.seconds,
        "vector_reads": result.report.get("vector_reads"),
        "shards": [{key: shard.get(key) for key in keep} for shard in result.shards]}))


def build_ours_one_shard(base_dir: str, out: str, budget_mb: int, threads: int) -> None:
    """Child process (--single-shard): `build_shard` on the whole base as one shard."""
    from pipelines.config import IndexSettings
    from pipelines.index.shard import build_shard
    from pipelines.index.vectors import FileVectors

    files = base_files(Path(base_dir))
    if len(files) > 1:  # catalog vectors: concatenate into one file the shard builder reads in chunks
        merged = Path(out).with_suffix(".vectors.npy")
        arrays = [np.load(p, mmap_mode="r") for p in files]
        total = np.lib.format.open_memmap(merged, mode="w+", dtype=np.float32,
                                          shape=(sum(len(a) for a in arrays), arrays[0].shape[1]))
        start = 0
        for array in arrays:
            for chunk_start in range(0, len(array), 50_000):
                chunk = array[chunk_start:chunk_start + 50_000]
                total[start:start + len(chunk)] = chunk
                start += len(chunk)
        del total
        files = [merged]
    source = FileVectors.open_npy(files[0])
    cfg = IndexSettings(memory_budget_mb=budget_mb, max_vectors_per_shard=max(source.count, 1))
    built = build_shard(source, cfg, threads=threads)
    import faiss

    faiss.write_index(built.index, out)
    Path(out + ".json").write_text(json.dumps({
        "factory": built.choice.factory, "search_params": built.search_params,
        "recall_check": built.recall_at_10, "tuning": built.tuning, "train_vectors": built.train_vectors}))


AUTOFAISS_SCRIPT = """
import json, sys
from autofaiss import build_index
base_dir, out, budget, memory, cores = sys.argv[1:6]
index, infos = build_index(embeddings=base_dir, index_path=out, index_infos_path=out + ".json",
                           max_index_memory_usage=budget, current_memory_available=memory,
                           metric_type="ip", nb_cores=int(cores), verbose=30)
"""


def run_child(command: list[str], log: Path) -> dict:
    """Run a builder under `nice -n 10` and GNU time: wall time and the builder's own peak RSS.

    GNU time forks from its own small process, so the peak is the builder's, not a copy of this
    (data-holding) process made by fork before exec.
    """
    rss_file = log.with_suffix(".maxrss")
    loads: list[float] = []
    stop = threading.Event()

    def sample_load() -> None:  # the machine is shared: say how busy it was while this builder ran
        while not stop.wait(15):
            loads.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample_load, daemon=True)
    sampler.start()
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), "nice", "-n", "10", *command],
                                stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO), "CATALOG_INDEX_NO_PROGRESS": "1"})
    seconds = time.perf_counter() - started
    stop.set()
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed (exit {result.returncode}); see {log}")
    peak_kib = int(rss_file.read_text().strip().splitlines()[-1])
    return {"build_s": round(seconds, 1), "peak_rss_mb": round(peak_kib / 1024),
            "load_avg_during_build": round(statistics.mean(loads), 1) if loads else None}


# ------------------------------------------------------------------------------------------
# evaluation (same faiss, same queries, same code for both)
# ------------------------------------------------------------------------------------------

@dataclass
class Part:
    """One searchable index file: a shard of ours, or autofaiss's whole index."""
    path: str
    params: dict | str
    row_of_vector: np.ndarray | None = None  # vector id -> global base row (None: ids are rows)
    index: object = None


def snapshot_parts(warehouse_root: Path, infos: dict, data: BenchData) -> list[Part]:
    """Every shard of our snapshot, with its vector id -> base row map from its id map."""
    import pyarrow.parquet as pq

    from pipelines.layout import snapshot_prefix

    shas = np.array(row_shas(data), dtype="S64")
    order = np.argsort(shas)
    folder = warehouse_root / snapshot_prefix(infos["index_name"], infos["snapshot_id"])
    parts = []
    for shard in infos["shards"]:
        idmap = pq.read_table(folder / shard["files"]["idmap"]["path"], columns=["vector_id", "sha256"])
        wanted = np.array(idmap.column("sha256").to_pylist(), dtype="S64")
        rows = order[np.searchsorted(shas, wanted, sorter=order)]
        row_of_vector = np.full(shard["vectors"], -1, dtype=np.int64)
        row_of_vector[idmap.column("vector_id").to_numpy()] = rows
        parts.append(Part(str(folder / shard["files"]["index"]["path"]), shard["search_params"], row_of_vector))
    return parts


def _open(part: Part, params=None):
    import faiss

    from pipelines.snapshot import apply_search_params

    if part.index is None:
        part.index = faiss.read_index(part.path)
    params = part.params if params is None else params
    if isinstance(params, dict):
        apply_search_params(part.index, params)
    elif params:
        faiss.ParameterSpace().set_index_parameters(part.index, params)
    return part.index


def search_parts(parts: list[Part], queries: np.ndarray, k: int) -> np.ndarray:
    """Search every part and merge by score: what the client does across shards."""
    scores, rows = [], []
    for part in parts:
        part_scores, ids = part.index.search(queries, k)
        if part.row_of_vector is not None:
            ids = np.where(ids >= 0, part.row_of_vector[np.maximum(ids, 0)], -1)
        scores.append(part_scores)
        rows.append(ids)
    if len(parts) == 1:
        return rows[0]
    scores, rows = np.hstack(scores), np.hstack(rows)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, best, axis=1)


def evaluate(parts: list[Part], data: BenchData, threads: int, rounds: int = 3,
             params: list | None = None) -> dict:
    """recall@10 on the held-out queries and on catalog queries, QPS of the held-out batch."""
    import faiss

    from pipelines.index.vectors import recall_at_k

    faiss.omp_set_num_threads(threads)
    for number, part in enumerate(parts):
        _open(part, None if params is None else params[number])
    recall = recall_at_k(search_parts(parts, data.queries, 10), data.truth, None, 10)
    speeds = []
    for _ in range(rounds):
        started = time.perf_counter()
        search_parts(parts, data.queries, 10)
        speeds.append(len(data.queries) / (time.perf_counter() - started))
    measured = {"recall_at_10": round(recall, 4), "qps": round(statistics.median(speeds), 1),
                "index_mb": round(sum(os.path.getsize(p.path) for p in parts) / 2**20, 1)}
    if len(data.catalog_query_ids):
        catalog = np.load(data.base_dir / "catalog.npy", mmap_mode="r")
        queries = np.ascontiguousarray(catalog[data.catalog_query_ids - (data.count - len(catalog))])
        approx = search_parts(parts, queries, 11)  # the query is in the base: it is dropped from both lists
        measured["catalog_recall_at_10"] = round(recall_at_k(approx, data.catalog_truth, data.catalog_query_ids, 10), 4)
    return measured


def nprobe_curve(parts: list[Part], data: BenchData, threads: int) -> list[dict]:
    """Our recall/speed trade-off around the tuned nprobe of every IVF shard (comparison at equal recall)."""
    curve = []
    for factor in (0.5, 1.5, 2.25):
        params = [{"nprobe": max(1, round(p.params["nprobe"] * factor))} if isinstance(p.params, dict)
                  and "nprobe" in p.params else p.params for p in parts]
        point = evaluate(parts, data, threads, rounds=1, params=params)
        curve.append({"nprobe_factor": factor, "nprobe": [p.get("nprobe") for p in params if isinstance(p, dict)],
                      **point})
    for part in parts:
        _open(part)  # back to the tuned values
    return curve


def efsearch_curve(part: Part, data: BenchData, threads: int) -> list[dict]:
    """autofaiss's HNSW at larger efSearch than its own tuning picked (comparison at equal recall)."""
    tuned = int(str(part.params).split("efSearch=")[1].split(",")[0])
    curve = [{"efSearch": tuned * factor, **evaluate([part], data, threads, rounds=1,
                                                     params=[f"efSearch={tuned * factor}"])} for factor in (2, 4)]
    _open(part)
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=200_000, help="synthetic base vectors (default 200,000)")
    parser.add_argument("--dim", type=int, default=1280, help="dimension (EfficientNet-Lite0 features: 1280)")
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=1000, help="held-out query vectors (not indexed)")
    parser.add_argument("--catalog-queries", type=int, default=300,
                        help="catalog vectors also used as queries (with --catalog-warehouse)")
    parser.add_argument("--budget-mb", type=int, default=384, help="index memory budget for both builders "
                        "(ours: index.memory_budget_mb, per shard)")
    parser.add_argument("--max-vectors-per-shard", type=int, default=1_000_000, help="ours: index.max_vectors_per_shard")
    parser.add_argument("--single-shard", action="store_true",
                        help="ours: build_shard on the whole base as one shard instead of build-index")
    parser.add_argument("--build-memory", default="8G", help="autofaiss current_memory_available")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="builds per builder; medians are reported")
    parser.add_argument("--catalog-warehouse", metavar="URI", help="also index the sample catalog's embeddings")
    parser.add_argument("--only", choices=["ours", "autofaiss"], help="run one builder")
    parser.add_argument("--prepare-only", action="store_true", help="generate vectors, truth and warehouse; build nothing")
    parser.add_argument("--reevaluate", action="store_true",
                        help="measure the indexes an earlier run with this label built again, without rebuilding")
    parser.add_argument("--work", default=str(HERE / "work"), help="scratch folder for vectors and indexes")
    parser.add_argument("--label", default=None, help="results/<label>.json (default from the sizes)")
    parser.add_argument("--_build-ours", nargs=4, metavar=("BASE", "OUT", "BUDGET", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--_build-ours-sharded", nargs=4, metavar=("WAREHOUSE", "OUT", "BUDGET", "MAX"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build_ours:
        base, out, budget, threads = args._build_ours
        build_ours_one_shard(base, out, int(budget), int(threads))
        return 0
    if args._build_ours_sharded:
        warehouse, out, budget, max_per_shard = args._build_ours_sharded
        build_ours_sharded(warehouse, out, int(budget), int(max_per_shard))
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare(work, args)
    warehouse_root = data.base_dir.parent / "warehouse"
    if not args.single_shard and args.only != "autofaiss":
        write_warehouse(data, warehouse_root)
    if args.prepare_only:
        return 0
    label = args.label or f"n{args.vectors}-d{args.dim}-budget{args.budget_mb}mb"
    builders = {
        "ours": lambda out: [sys.executable, __file__, "--_build-ours-sharded", warehouse_root.resolve().as_uri(), out,
                             str(args.budget_mb), str(args.max_vectors_per_shard)] if not args.single_shard else
        [sys.executable, __file__, "--_build-ours", str(data.base_dir), out, str(args.budget_mb), str(args.threads)],
        "autofaiss": lambda out: [str(AUTOFAISS_PYTHON), "-c", AUTOFAISS_SCRIPT, str(data.base_dir), out,
                                  f"{args.budget_mb}M", args.build_memory, str(args.threads)],
    }
    target = HERE / "results" / f"{label}.json"
    saved = json.loads(target.read_text()).get("results", {}) if target.exists() else {}
    results: dict[str, dict] = {}
    for name, command in builders.items():
        if args.only and name != args.only:
            continue
        if name == "autofaiss" and not AUTOFAISS_PYTHON.exists():
            print("bench/.venv-autofaiss missing: see bench/index/README.md to create it")
            continue
        runs = []
        for repeat in range(args.repeats):
            out = str(work / f"{label}-{name}-{repeat}.faiss")
            earlier = saved.get(name, {}).get("runs", [])
            if args.reevaluate and repeat < len(earlier) and Path(out + ".json").exists():
                # measure again what an earlier run built (e.g. with more search points); keep its build figures
                measured = {key: earlier[repeat][key] for key in ("build_s", "peak_rss_mb", "load_avg_during_build")}
                print(f"re-evaluating {name} run {repeat + 1} (built earlier)...", flush=True)
            else:
                if name == "ours" and not args.single_shard:
                    shutil.rmtree(warehouse_root / "indexes", ignore_errors=True)  # earlier builds' snapshots
                print(f"building with {name} (run {repeat + 1}/{args.repeats})...", flush=True)
                measured = run_child(command(out), Path(out + ".log"))
            infos = json.loads(Path(out + ".json").read_text())
            if name == "ours" and not args.single_shard:
                parts = snapshot_parts(warehouse_root, infos, data)
                measured["shards"] = [{key: shard[key] for key in ("shard_id", "index_type", "faiss_factory",
                                       "search_params", "vectors", "recall_at_10", "train_vectors", "build_seconds",
                                       "estimated_memory_bytes")} | {"categories": len(shard["categories"])}
                                      for shard in infos["shards"]]
                measured["vector_reads"] = infos.get("vector_reads")
                factory = " + ".join(f"{s['faiss_factory']} ({s['vectors']:,})" for s in infos["shards"])
                params = [s["search_params"] for s in infos["shards"]]
            else:
                params = infos["search_params"] if name == "ours" else infos.get("index_param", "")
                factory = infos["factory"] if name == "ours" else infos.get("index_key")
                parts = [Part(out, params)]
            measured.update(evaluate(parts, data, args.threads), factory=factory, search_params=params)
            if name == "ours" and any(isinstance(p.params, dict) and "nprobe" in p.params for p in parts):
                measured["nprobe_curve"] = nprobe_curve(parts, data, args.threads)
            if name == "autofaiss" and isinstance(params, str) and "efSearch=" in params:
                measured["efsearch_curve"] = efsearch_curve(parts[0], data, args.threads)
            del parts
            print(f"  {json.dumps(measured)}", flush=True)
            runs.append(measured)
        results[name] = {key: (statistics.median(r[key] for r in runs) if isinstance(runs[0][key], (int, float))
                               else runs[0][key]) for key in runs[0]}
        results[name]["runs"] = runs

    sys.stdout.flush()
    catalog = len(data.catalog_shas)
    print(f"\n{data.count:,} x {args.dim} float32 vectors ({args.vectors:,} synthetic + {catalog:,} sample catalog), "
          f"{len(data.queries)} held-out queries, index budget {args.budget_mb} MB, {args.threads} threads, "
          f"medians of {args.repeats} build(s)")
    print(f"{'':12}{'build s':>10}{'peak RSS MB':>13}{'index MB':>10}{'recall@10':>11}{'QPS':>9}"
          f"{'catalog recall@10':>19}  index")
    for name, r in results.items():
        print(f"{name:12}{r['build_s']:>10.1f}{r['peak_rss_mb']:>13.0f}{r['index_mb']:>10.1f}{r['recall_at_10']:>11.4f}"
              f"{r['qps']:>9.0f}{r.get('catalog_recall_at_10', float('nan')):>19.4f}  {r['factory']}")
    for point in results.get("ours", {}).get("nprobe_curve", []):
        print(f"  ours at nprobe x{point['nprobe_factor']} {point['nprobe']}: recall@10 {point['recall_at_10']:.4f}  "
              f"QPS {point['qps']:.0f}")
    for point in results.get("autofaiss", {}).get("efsearch_curve", []):
        print(f"  autofaiss at efSearch {point['efSearch']}: recall@10 {point['recall_at_10']:.4f}  QPS {point['qps']:.0f}"
              f"  catalog recall@10 {point.get('catalog_recall_at_10', float('nan')):.4f}")
    if "ours" in results and "autofaiss" in results:
        ours, theirs = results["ours"], results["autofaiss"]
        print(f"ratios ours/autofaiss: build time {ours['build_s'] / theirs['build_s']:.2f}, peak RSS "
              f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}, recall@10 {ours['recall_at_10'] - theirs['recall_at_10']:+.4f} "
              f"(difference), QPS {ours['qps'] / theirs['qps']:.2f}")
        print(f"goal (recall@10 >= 0.95 and >= autofaiss, build time <= autofaiss): "
              f"{'met' if ours['recall_at_10'] >= max(0.95, theirs['recall_at_10']) and ours['build_s'] <= theirs['build_s'] else 'NOT met'}")
    (HERE / "results").mkdir(exist_ok=True)
    previous = saved if args.only else {}
    target.write_text(json.dumps(
        {"vectors": data.count, "synthetic_vectors": args.vectors, "catalog_vectors": catalog, "dim": args.dim,
         "queries": len(data.queries), "catalog_queries": len(data.catalog_query_ids), "budget_mb": args.budget_mb,
         "max_vectors_per_shard": args.max_vectors_per_shard, "single_shard": args.single_shard,
         "threads": args.threads, "repeats": args.repeats, "results": {**previous, **results}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
