"""bench/index: this project's shard build vs autofaiss on the same vectors and the same memory budget.

    nice -n 10 .venv/bin/python bench/index/run.py --vectors 200000 --dim 1280 --budget-mb 384

Both builders read the same float32 .npy of synthetic clustered, L2-normalised vectors (plus
the sample catalog's embeddings with --catalog-warehouse) and get the same index memory budget
(autofaiss: max_index_memory_usage). Each runs in its own process (autofaiss from its own
virtualenv, bench/.venv-autofaiss, because it needs an old pyarrow), timed end to end, with its
peak RSS from the kernel (wait4 ru_maxrss). Then this process loads both indexes with the same
faiss, applies each builder's own search parameters and measures, on held-out query vectors that
are not in the index: recall@10 against exact search and queries per second (batch search).

Numbers, not pass/fail. Results go to stdout and bench/index/results/<label>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
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


def clustered_points(structure, rng: np.random.Generator, count: int) -> np.ndarray:
    """Clustered vectors with a low intrinsic dimension, like CNN features: a cluster centre plus
    a point of the cluster's 24-dim subspace plus small isotropic noise, L2-normalised."""
    centres, bases, scales = structure
    dim = centres.shape[1]
    labels = rng.integers(0, len(centres), count)
    latent = rng.standard_normal((count, LATENT_DIM)).astype(np.float32) * scales[labels, None]
    points = centres[labels].copy()
    for cluster in np.unique(labels):  # per cluster: no (count, 24, dim) temporary
        members = labels == cluster
        points[members] += (latent[members] @ bases[cluster]) * 0.25  # ~1.2 from the centre: neighbours spill over IVF cells
    points += rng.standard_normal((count, dim)).astype(np.float32) * (0.25 / np.sqrt(dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def generate(path: Path, structure, rng: np.random.Generator, count: int, chunk: int = 20_000) -> None:
    """Write `count` points chunk by chunk: 1M x 1280 needs one chunk of RAM, not 5 GB."""
    dim = structure[0].shape[1]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(count, dim))
    for start in range(0, count, chunk):
        out[start:start + min(chunk, count - start)] = clustered_points(structure, rng, min(chunk, count - start))
    out.flush()
    del out


def catalog_vectors(warehouse: str | None) -> np.ndarray | None:
    """The sample catalog's embeddings (newest model version) when a warehouse has them."""
    if not warehouse:
        return None
    from pipelines.storage import open_storage

    storage = open_storage(warehouse)
    versions = storage.list_dirs("embeddings")
    if not versions:
        print(f"no embeddings under {warehouse}/embeddings: synthetic vectors only")
        return None
    table = storage.read_table(f"embeddings/{versions[-1]}/", columns=["vector"])
    vectors = np.array(table.column("vector").to_pylist(), dtype=np.float32)
    print(f"sample catalog: {len(vectors):,} vectors of model {versions[-1]}")
    return vectors


def prepare(work: Path, args) -> tuple[Path, np.ndarray, np.ndarray]:
    """(base .npy inside its own folder, held-out queries, exact top-10 ids), cached by parameters."""
    key = f"n{args.vectors}-d{args.dim}-c{args.clusters}-s{args.seed}" + ("-catalog" if args.catalog_warehouse else "")
    folder = work / key
    base_dir = folder / "embeddings"           # autofaiss reads every .npy of a folder
    base = base_dir / "base.npy"
    queries_path, truth_path = folder / "queries.npy", folder / "truth.npy"
    if not (base.exists() and queries_path.exists() and truth_path.exists()):
        base_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        structure = cluster_structure(args.seed, args.clusters, args.dim)
        generate(base, structure, np.random.default_rng(args.seed + 1), args.vectors)
        catalog = catalog_vectors(args.catalog_warehouse)
        if catalog is not None:
            if catalog.shape[1] != args.dim:
                raise SystemExit(f"catalog vectors have dimension {catalog.shape[1]}, not --dim {args.dim}")
            np.save(base_dir / "catalog.npy", catalog)
        # Held-out queries: new points of the same clusters, never indexed.
        queries = clustered_points(structure, np.random.default_rng(args.seed + 2), args.queries)
        np.save(queries_path, queries)
        print(flush=True); print(f"generated {args.vectors:,} x {args.dim} vectors in {time.perf_counter() - started:.0f}s; "
              "computing exact top-10 for the held-out queries...")
        started = time.perf_counter()
        truth = exact_truth(base_dir, queries)
        np.save(truth_path, truth)
        print(f"exact search: {time.perf_counter() - started:.0f}s")
    return base_dir, np.load(queries_path), np.load(truth_path)


def base_files(base_dir: Path) -> list[Path]:
    return sorted(base_dir.glob("*.npy"))


def exact_truth(base_dir: Path, queries: np.ndarray, k: int = 10) -> np.ndarray:
    from pipelines.index import FileVectors, exact_top_k

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
# builders (each in its own process)
# ------------------------------------------------------------------------------------------

def build_ours(base_dir: str, out: str, budget_mb: int, threads: int) -> None:
    """Child process: the same `build_shard` a Spark shard task runs, on the bench vectors."""
    from pipelines.index import FileVectors, IndexSettings, build_shard

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
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(rss_file), "nice", "-n", "10", *command],
                                stdout=handle, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{command[:3]} failed (exit {result.returncode}); see {log}")
    peak_kib = int(rss_file.read_text().strip().splitlines()[-1])
    return {"build_s": round(seconds, 1), "peak_rss_mb": round(peak_kib / 1024)}


# ------------------------------------------------------------------------------------------
# evaluation (same faiss, same queries, same code for both)
# ------------------------------------------------------------------------------------------

def evaluate(index_path: str, params: dict | str, queries: np.ndarray, truth: np.ndarray, threads: int,
             rounds: int = 3) -> dict:
    import faiss

    from pipelines.index import apply_search_params, recall_at_k

    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(index_path)
    if isinstance(params, dict):
        apply_search_params(index, params)
    elif params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    _, ids = index.search(queries, 10)
    recall = recall_at_k(ids, truth, None, 10)
    speeds = []
    for _ in range(rounds):
        started = time.perf_counter()
        index.search(queries, 10)
        speeds.append(len(queries) / (time.perf_counter() - started))
    return {"recall_at_10": round(recall, 4), "qps": round(statistics.median(speeds), 1),
            "index_mb": round(os.path.getsize(index_path) / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=200_000, help="synthetic base vectors (default 200,000)")
    parser.add_argument("--dim", type=int, default=1280, help="dimension (EfficientNet-Lite0 features: 1280)")
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=1000, help="held-out query vectors (not indexed)")
    parser.add_argument("--budget-mb", type=int, default=384, help="index memory budget for both builders")
    parser.add_argument("--build-memory", default="8G", help="autofaiss current_memory_available")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="builds per builder; medians are reported")
    parser.add_argument("--catalog-warehouse", metavar="URI", help="also index the sample catalog's embeddings")
    parser.add_argument("--only", choices=["ours", "autofaiss"], help="run one builder")
    parser.add_argument("--work", default=str(HERE / "work"), help="scratch folder for vectors and indexes")
    parser.add_argument("--label", default=None, help="results/<label>.json (default from the sizes)")
    parser.add_argument("--_build-ours", nargs=4, metavar=("BASE", "OUT", "BUDGET", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build_ours:
        base, out, budget, threads = args._build_ours
        build_ours(base, out, int(budget), int(threads))
        return 0

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base_dir, queries, truth = prepare(work, args)
    label = args.label or f"n{args.vectors}-d{args.dim}-budget{args.budget_mb}mb"
    builders = {
        "ours": lambda out: [sys.executable, __file__, "--_build-ours", str(base_dir), out, str(args.budget_mb),
                             str(args.threads)],
        "autofaiss": lambda out: [str(AUTOFAISS_PYTHON), "-c", AUTOFAISS_SCRIPT, str(base_dir), out,
                                  f"{args.budget_mb}M", args.build_memory, str(args.threads)],
    }
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
            print(f"building with {name} (run {repeat + 1}/{args.repeats})...", flush=True)
            measured = run_child(command(out), Path(out + ".log"))
            infos = json.loads(Path(out + ".json").read_text())
            params = infos["search_params"] if name == "ours" else infos.get("index_param", "")
            factory = infos["factory"] if name == "ours" else infos.get("index_key")
            measured.update(evaluate(out, params, queries, truth, args.threads), factory=factory,
                            search_params=params)
            if name == "ours" and isinstance(params, dict) and "nprobe" in params:
                # the recall/speed trade-off around the tuned point, for comparison at equal recall
                curve = []
                for factor in (0.5, 1.5, 2.25):
                    value = max(1, round(params["nprobe"] * factor))
                    curve.append({"nprobe": value, **evaluate(out, {"nprobe": value}, queries, truth, args.threads,
                                                              rounds=1)})
                measured["nprobe_curve"] = curve
            print(f"  {json.dumps(measured)}", flush=True)
            runs.append(measured)
        results[name] = {key: (statistics.median(r[key] for r in runs) if isinstance(runs[0][key], (int, float))
                               else runs[0][key]) for key in runs[0]}
        results[name]["runs"] = runs

    sys.stdout.flush()
    print(f"\n{args.vectors:,} x {args.dim} float32 vectors, {args.queries} held-out queries, index budget "
          f"{args.budget_mb} MB, {args.threads} threads, medians of {args.repeats} build(s)")
    print(f"{'':12}{'index':>34}{'build s':>10}{'peak RSS MB':>13}{'index MB':>10}{'recall@10':>11}{'QPS':>9}")
    for name, r in results.items():
        print(f"{name:12}{str(r['factory']):>34}{r['build_s']:>10.1f}{r['peak_rss_mb']:>13.0f}{r['index_mb']:>10.1f}"
              f"{r['recall_at_10']:>11.4f}{r['qps']:>9.0f}")
    for point in results.get("ours", {}).get("nprobe_curve", []):
        print(f"  ours at nprobe={point['nprobe']:<5} recall@10 {point['recall_at_10']:.4f}  QPS {point['qps']:.0f}")
    if "ours" in results and "autofaiss" in results:
        ours, theirs = results["ours"], results["autofaiss"]
        print(f"ratios ours/autofaiss: build time {ours['build_s'] / theirs['build_s']:.2f}, peak RSS "
              f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}, recall@10 {ours['recall_at_10'] - theirs['recall_at_10']:+.4f} "
              f"(difference), QPS {ours['qps'] / theirs['qps']:.2f}")
        print(f"goal (recall@10 >= 0.95 and >= autofaiss, build time <= autofaiss): "
              f"{'met' if ours['recall_at_10'] >= max(0.95, theirs['recall_at_10']) and ours['build_s'] <= theirs['build_s'] else 'NOT met'}")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{label}.json").write_text(json.dumps(
        {"vectors": args.vectors, "dim": args.dim, "queries": args.queries, "budget_mb": args.budget_mb,
         "threads": args.threads, "repeats": args.repeats, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
