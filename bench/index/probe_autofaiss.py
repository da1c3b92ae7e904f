"""Time the phases of autofaiss's own index choice on a sample, when the whole build is too slow to run here.

    nice -n 10 bench/.venv-autofaiss/bin/python bench/index/probe_autofaiss.py \
        bench/index/work/n1000000-d1280-c2000-s0-catalog/embeddings 2048M [--opq]

Runs in autofaiss's virtualenv. Uses autofaiss's own rules (get_optimal_index_keys_v2,
get_optimal_train_size, its index_factory) to make the index it would build for these vectors and
this budget, then times, on the bench vectors:

* with --opq, OPQ training (on as many points as faiss's OPQ keeps), with 1 and 2 outer
  iterations: the first iteration and each further one, extrapolated to faiss's default of 50
  (without it, OPQ counts 0 s, and a random rotation to the same dimension feeds the k-means probe);
* one k-means iteration of the IVF coarse quantizer as faiss runs it (rebuild the HNSW graph of the
  centroids, assign the training points through it), the assignment on a sample of the training set,
  extrapolated to the full training set and faiss's 10 iterations for IVF;
* the coarse assignment of every vector when adding (the same HNSW search), extrapolated to all.

The sum is a lower bound of autofaiss's build time: PQ training, PQ encoding and autofaiss's
search-parameter tuning are left out. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np
from autofaiss.external.optimize import get_optimal_index_keys_v2, get_optimal_train_size
from autofaiss.indices.index_factory import index_factory

IVF_KMEANS_ITERATIONS = 10    # faiss Level1Quantizer sets cp.niter = 10 for IVF training
OPQ_ITERATIONS = 50           # faiss OPQMatrix.niter default


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_dir", help="folder of the bench's .npy files (what autofaiss indexes)")
    parser.add_argument("budget", help="max_index_memory_usage, e.g. 2048M")
    parser.add_argument("--memory", default="8G", help="current_memory_available (as in run.py)")
    parser.add_argument("--sample", type=int, default=20_000, help="training points assigned to time k-means")
    parser.add_argument("--opq", action="store_true", help="also time OPQ training (1 and 2 iterations: slow)")
    args = parser.parse_args()
    base_dir, budget, memory, sample = args.base_dir, args.budget, args.memory, args.sample
    faiss.omp_set_num_threads(2)
    arrays = [np.load(path, mmap_mode="r") for path in sorted(Path(base_dir).glob("*.npy"))]
    count, dim = sum(len(a) for a in arrays), arrays[0].shape[1]
    key = get_optimal_index_keys_v2(count, dim, budget)[0]
    train_size = get_optimal_train_size(count, key, memory, dim)
    out = {"vectors": count, "dim": dim, "budget": budget, "index_key": key, "train_size": train_size}
    print(json.dumps(out), flush=True)
    index = index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    if not isinstance(index, faiss.IndexPreTransform):
        raise SystemExit(f"{key}: this probe times OPQ + IVF_HNSW indexes only")
    ivf = faiss.extract_index_ivf(index)
    template = faiss.downcast_VectorTransform(index.chain.at(0))
    rng = np.random.default_rng(0)
    # autofaiss trains on the first train_size vectors; faiss's OPQ keeps a random max_train_points of them
    opq_points = int(min(train_size, template.max_train_points))
    opq_sample = np.ascontiguousarray(arrays[0][np.sort(rng.choice(train_size, opq_points, replace=False))])

    out["opq_train_points"] = opq_points
    out["opq_seconds_estimate"] = 0
    opq = faiss.RandomRotationMatrix(dim, template.d_out)  # stands in for the trained OPQ rotation
    opq.init(0)
    if args.opq:
        opq_seconds = []
        for iterations in (1, 2):
            opq = faiss.OPQMatrix(dim, template.M, template.d_out)
            opq.niter = iterations
            started = time.perf_counter()
            opq.train(opq_sample)
            opq_seconds.append(time.perf_counter() - started)
        out["opq_seconds_1_and_2_iterations"] = [round(s, 1) for s in opq_seconds]
        per_iteration = max(opq_seconds[1] - opq_seconds[0], 0.0)
        out["opq_seconds_estimate"] = round(opq_seconds[0] + (OPQ_ITERATIONS - 1) * per_iteration)
        print(json.dumps(out), flush=True)

    quantizer = faiss.downcast_index(ivf.quantizer)
    picks = rng.choice(train_size, ivf.nlist + min(sample, train_size), replace=False)
    rotated = opq.apply_py(np.ascontiguousarray(arrays[0][np.sort(picks)]))[rng.permutation(len(picks))]
    centroids = np.ascontiguousarray(rotated[:ivf.nlist])  # k-means starts from training points
    started = time.perf_counter()
    quantizer.add(centroids)                       # what each k-means iteration does first
    graph_seconds = time.perf_counter() - started
    points = np.ascontiguousarray(rotated[ivf.nlist:])
    started = time.perf_counter()
    quantizer.search(points, 1)                    # then: assign every training point through the graph
    per_point = (time.perf_counter() - started) / len(points)
    kmeans_iteration = graph_seconds + per_point * train_size
    out.update({"centroid_graph_seconds": round(graph_seconds, 1), "assign_sample": len(points),
                "assign_ms_per_point": round(per_point * 1000, 3),
                "kmeans_iteration_seconds_estimate": round(kmeans_iteration),
                "kmeans_seconds_estimate": round(IVF_KMEANS_ITERATIONS * kmeans_iteration),
                "add_assign_seconds_estimate": round(per_point * count)})
    out["lower_bound_seconds"] = out["opq_seconds_estimate"] + out["kmeans_seconds_estimate"] + \
        out["add_assign_seconds_estimate"]
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
