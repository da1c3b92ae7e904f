"""`catalog-index score`: re-measure a pulled snapshot's recall@10 and search latency on this host.

What autofaiss's `score_index` does for one index, per shard of a snapshot: sample vectors of
the shard as queries (read back from the index itself, so it needs no embeddings), find their
exact top-10 by scanning the shard's vectors in chunks, and compare with what the index
returns at the snapshot's search parameters (the query's own vector left out, as the build
measures it). Latency is one query at a time, per shard (raw FAISS, comparable with the
build's figure in the manifest) and end to end through `OpenSnapshot.search_vectors` (every
shard plus the merge: what a search request costs). This module never writes anything.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipelines.search import OpenSnapshot
from pipelines.snapshot import RECALL_K

CHUNK_BYTES = 256 << 20   # vectors scanned at once for the exact top-k


@dataclass
class ShardScore:
    shard_id: str
    index_type: str
    vectors: int
    queries: int
    recall_at_10: float
    manifest_recall_at_10: float
    p50_ms: float
    p99_ms: float
    manifest_latency_ms: dict | None


@dataclass
class SnapshotScore:
    snapshot_id: str
    threshold: float
    shards: list[ShardScore] = field(default_factory=list)
    search_p50_ms: float = 0.0
    search_p99_ms: float = 0.0

    @property
    def passed(self) -> bool:
        return all(s.recall_at_10 >= self.threshold for s in self.shards)


def _percentiles(milliseconds: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(milliseconds, [50, 99])
    return round(float(p50), 4), round(float(p99), 4)


def _exact_top(index, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k ids of `queries` among the index's own (reconstructed) vectors, chunk by chunk."""
    n, dim = index.ntotal, index.d
    chunk = max(1, CHUNK_BYTES // (4 * dim))
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        scores = queries @ index.reconstruct_n(start, count).T
        ids = np.broadcast_to(np.arange(start, start + count), scores.shape)
        scores, ids = np.hstack([best_scores, scores]), np.hstack([best_ids, ids])
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
    return best_ids


def score_snapshot(snapshot: OpenSnapshot, queries_per_shard: int = 200, seed: int = 0) -> SnapshotScore:
    rng = np.random.default_rng(seed)
    result = SnapshotScore(snapshot.snapshot_id, float(snapshot.manifest["recall_at_10"]["threshold"]))
    end_to_end: list[float] = []
    for shard in snapshot.shards:
        index = shard.index
        ids = np.sort(rng.choice(index.ntotal, min(queries_per_shard, index.ntotal), replace=False))
        if shard.kind.startswith("ivf"):
            shard.vector_of_row(0)  # builds the IVF direct map that reconstruct needs
        queries = np.vstack([index.reconstruct(int(i)) for i in ids]).astype(np.float32)
        queries /= np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        k = min(RECALL_K + 1, index.ntotal)
        exact = _exact_top(index, queries, k)
        approx = index.search(queries, k)[1]
        found = total = 0
        for own, truth, got in zip(ids, exact, approx):
            truth = [t for t in truth if t != own][:RECALL_K]
            found += len(set(truth) & {g for g in got if g != own})
            total += len(truth)
        timings = []
        for query in queries:
            started = time.perf_counter()
            index.search(query[None, :], RECALL_K)
            timings.append((time.perf_counter() - started) * 1000)
        for query in queries[:50]:
            started = time.perf_counter()
            snapshot.search_vectors(query, RECALL_K)
            end_to_end.append((time.perf_counter() - started) * 1000)
        p50, p99 = _percentiles(timings)
        result.shards.append(ShardScore(shard.shard_id, shard.kind, int(index.ntotal), len(ids),
                                        round(found / total, 4) if total else 1.0, shard.entry["recall_at_10"],
                                        p50, p99, shard.entry.get("search_latency_ms")))
    result.search_p50_ms, result.search_p99_ms = _percentiles(end_to_end)
    return result
