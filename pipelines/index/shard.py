"""One shard's FAISS index: train (IVF, on a sample), add every vector (on a GPU when faiss-gpu
sees one), tune nprobe (HNSW: efSearch) on held-out vectors to `target_recall`, and measure
recall@10 against exact search on other held-out vectors, and the latency of one query at a
time (p50/p99) at the tuned parameters on the same vectors.

`build_shard` is a plain function over any `VectorSource`: tests and the benchmark call it
directly, `pipelines.index.tasks.run_shard_task` wraps it in a Spark task. This module must never
read or write the warehouse, and never import faiss at import time.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.config import IndexSettings
from pipelines.index.errors import IndexBuildError
from pipelines.index.plan import IndexChoice, choose_index_type
from pipelines.index.vectors import (
    VectorSource,
    chunk_rows_for,
    exact_top_k,
    iter_chunks,
    recall_at_k,
)
from pipelines.snapshot import RECALL_K, apply_search_params


@dataclass
class ShardBuild:
    """The outcome of `build_shard`: the index plus everything the manifest says about it."""
    index: Any
    choice: IndexChoice
    search_params: dict[str, int]
    recall_at_10: float
    tuning: list[dict[str, float]]
    train_vectors: int
    recall_queries: int
    build_seconds: float
    device: str
    search_latency_ms: dict[str, float] | None = None


LATENCY_WARMUP = 5  # queries run before timing: first touches of the index's pages are not search time


def measure_latency(index, queries: np.ndarray, k: int = RECALL_K) -> dict[str, float]:
    """p50/p99 in ms of one query at a time, at the parameters already applied to `index`: what
    a search service pays per request (a batch search would hide it)."""
    import faiss  # here, not at module top: keeps faiss out of import time

    for query in queries[:LATENCY_WARMUP]:
        index.search(query[None, :], k)
    timings = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None, :], k)
        timings.append((time.perf_counter() - started) * 1000)
    p50, p99 = np.percentile(timings, [50, 99]) if timings else (0.0, 0.0)
    return {"p50": round(float(p50), 4), "p99": round(float(p99), 4), "queries": len(timings),
            "threads": int(faiss.omp_get_max_threads())}


def _search_with(index, queries: np.ndarray, k: int, params: dict[str, int]) -> np.ndarray:
    apply_search_params(index, params)
    return index.search(queries, k)[1]


def _candidate_values(kind: str, nlist: int) -> tuple[str, list[int]]:
    if kind == "hnsw":
        return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    if kind.startswith("ivf"):
        values, value = [], 1
        while value < nlist:
            values.append(value)
            value = value * 3 // 2 if value >= 4 else value + 1
        return "nprobe", values + [nlist]
    return "", []


def _gpu_count(cfg: IndexSettings) -> int:
    if not cfg.use_gpu:
        return 0
    import faiss  # here, not at module top: keeps faiss out of import time

    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # faiss-cpu builds may lack the symbol
        return 0


def _train_and_add(index, choice: IndexChoice, source: VectorSource, train: np.ndarray, cfg: IndexSettings) -> tuple[Any, str]:
    """Train (IVF only) and add every vector; on a GPU when faiss-gpu sees one, else on the CPU."""
    import faiss  # here, not at module top: keeps faiss out of import time

    chunk_rows = chunk_rows_for(source.dim, 128 * 1024 * 1024)
    if choice.kind.startswith("ivf") and _gpu_count(cfg) > 0:
        try:
            gpu_index = faiss.index_cpu_to_all_gpus(index)
            gpu_index.train(train)
            for _, chunk in iter_chunks(source, chunk_rows):
                gpu_index.add(np.ascontiguousarray(chunk))
            return faiss.index_gpu_to_cpu(gpu_index), f"gpu x{faiss.get_num_gpus()}"
        except RuntimeError as exc:  # e.g. a PQ code size faiss-gpu does not implement: the CPU can
            print(f"faiss-gpu could not build {choice.factory} ({exc}); building on the CPU")
    if choice.kind.startswith("ivf"):
        index.train(train)
    for _, chunk in iter_chunks(source, chunk_rows):
        index.add(np.ascontiguousarray(chunk))
    return index, "cpu"


def build_shard(source: VectorSource, cfg: IndexSettings, choice: IndexChoice | None = None,
                threads: int | None = None) -> ShardBuild:
    """Build, tune and check one shard's index from its vectors (vector id = row number).

    Held-out vectors are never in the training sample; half of them tune nprobe/efSearch,
    the other half measure the recall@10 that goes into the manifest.
    """
    import faiss  # here, not at module top: keeps faiss out of import time

    started = time.perf_counter()
    if threads:
        faiss.omp_set_num_threads(threads)
    n, dim = source.count, source.dim
    if n == 0:
        raise IndexBuildError("a shard with no vectors cannot be built")
    choice = choice or choose_index_type(n, dim, cfg)
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)
    held_out = min(2 * cfg.recall_queries, max(2, n // 5))
    tune_ids = np.sort(order[:held_out // 2])
    check_ids = np.sort(order[held_out // 2:held_out])
    train_pool = order[held_out:] if n - held_out >= 1000 else order
    train_size = 0
    train = np.empty((0, dim), dtype=np.float32)
    if choice.kind.startswith("ivf"):
        wanted = max(choice.nlist * cfg.train_points_per_list, 256 * 40 if choice.kind == "ivf_pq" else 0)
        train_ids = np.sort(train_pool[:min(len(train_pool), wanted)])
        train = source.take(train_ids)
        train_size = len(train_ids)
        if train_size < choice.nlist:
            raise IndexBuildError(f"{choice.factory} needs at least {choice.nlist} training vectors, the shard has "
                                  f"{train_size}: lower index.nlist or let index_type be auto")

    index = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if choice.kind.startswith("ivf"):
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = cfg.kmeans_iterations
        ivf.cp.seed = cfg.seed
        ivf.cp.max_points_per_centroid = max(cfg.train_points_per_list, 1) * 4  # we sampled already
        ivf.cp.verbose = False
        if choice.kind == "ivf_pq":
            # index_factory turns on polysemous training, which we never search with and which
            # costs more than the whole rest of the build
            faiss.downcast_index(ivf).do_polysemous_training = False
    if choice.kind == "hnsw":
        index.hnsw.efConstruction = cfg.hnsw_ef_construction
    index, device = _train_and_add(index, choice, source, train, cfg)
    del train

    tune_queries = source.take(tune_ids)
    check_queries = source.take(check_ids)
    k = RECALL_K + 1  # +1: the query's own vector is dropped from both lists
    _, tune_exact = exact_top_k(source, tune_queries, k)
    _, check_exact = exact_top_k(source, check_queries, k)

    param_name, candidates = _candidate_values(choice.kind, choice.nlist)
    fixed = cfg.nprobe if param_name == "nprobe" else cfg.ef_search if param_name == "efSearch" else None
    tuning: list[dict[str, float]] = []
    params: dict[str, int] = {}
    if param_name:
        if fixed:
            candidates = [min(fixed, choice.nlist) if param_name == "nprobe" else fixed]
        for value in candidates:
            recall = recall_at_k(_search_with(index, tune_queries, k, {param_name: value}), tune_exact, tune_ids, RECALL_K)
            tuning.append({param_name: value, "recall_at_10": round(recall, 4)})
            params = {param_name: value}
            if recall >= cfg.target_recall:
                break
    approx = _search_with(index, check_queries, k, params) if params else index.search(check_queries, k)[1]
    recall = recall_at_k(approx, check_exact, check_ids, RECALL_K)
    latency = measure_latency(index, check_queries)  # at the tuned parameters, like the recall above
    return ShardBuild(index=index, choice=choice, search_params=params, recall_at_10=round(recall, 4),
                      tuning=tuning, train_vectors=train_size, recall_queries=len(check_ids),
                      build_seconds=round(time.perf_counter() - started, 2), device=device,
                      search_latency_ms=latency)
