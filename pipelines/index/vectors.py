"""A shard's vectors, read in chunks: `VectorSource` and its two kinds (in memory, in a local
file), plus exact search and recall@k, which measure an index against them.

A source hands out row ranges and picked rows; this module must never hold a whole file-backed
shard in anonymous memory (vectors are read with pread, nothing stays mapped), never read the
warehouse, and never import faiss at import time.
"""
from __future__ import annotations

import os
from typing import Iterator, Protocol

import numpy as np


class VectorSource(Protocol):
    count: int
    dim: int

    def read(self, start: int, stop: int) -> np.ndarray: ...
    def take(self, ids: np.ndarray) -> np.ndarray: ...


class ArrayVectors:
    """Vectors already in memory (tests, small shards)."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.count, self.dim = self.vectors.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.vectors[start:stop]

    def take(self, ids: np.ndarray) -> np.ndarray:
        return self.vectors[np.asarray(ids, dtype=np.int64)]


class FileVectors:
    """float32 rows in a flat file (or a .npy file), read with pread: nothing stays mapped.

    Reading instead of memory-mapping keeps the process's resident memory to the chunk being
    used; the page cache may hold the file, but the kernel can drop it under pressure.
    """

    def __init__(self, path: str | os.PathLike, count: int, dim: int, offset: int = 0):
        self.path, self.count, self.dim, self.offset = str(path), count, dim, offset
        self._row_bytes = 4 * dim

    @classmethod
    def open_npy(cls, path: str | os.PathLike) -> "FileVectors":
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            shape, fortran, dtype = np.lib.format._read_array_header(handle, version)
            if dtype != np.float32 or fortran or len(shape) != 2:
                raise ValueError(f"{path}: need a C-ordered (n, d) float32 .npy, got {dtype} {shape}")
            return cls(path, shape[0], shape[1], handle.tell())

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.count)
        with open(self.path, "rb") as handle:
            handle.seek(self.offset + start * self._row_bytes)
            data = np.fromfile(handle, dtype=np.float32, count=(stop - start) * self.dim)
        return data.reshape(stop - start, self.dim)

    def take(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        with open(self.path, "rb") as handle:
            fd = handle.fileno()
            for row, vector_id in enumerate(ids):
                out[row] = np.frombuffer(os.pread(fd, self._row_bytes, self.offset + int(vector_id) * self._row_bytes),
                                         dtype=np.float32)
        return out


def iter_chunks(source: VectorSource, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, source.count, chunk_rows):
        yield start, source.read(start, start + chunk_rows)


def chunk_rows_for(dim: int, target_bytes: int = 256 * 1024 * 1024) -> int:
    return max(1024, target_bytes // (4 * dim))


def exact_top_k(source: VectorSource, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over a source, chunk by chunk (bounded memory)."""
    import faiss  # here, not at module top: keeps faiss out of import time

    k = min(k, source.count)
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.empty((len(queries), 0), dtype=np.int64)
    for start, chunk in iter_chunks(source, chunk_rows_for(source.dim)):
        scores, ids = faiss.knn(queries, np.ascontiguousarray(chunk), min(k, len(chunk)), metric=faiss.METRIC_INNER_PRODUCT)
        best_scores = np.hstack([best_scores, scores])
        best_ids = np.hstack([best_ids, ids + start])
        if best_scores.shape[1] > k:
            keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
            best_scores = np.take_along_axis(best_scores, keep, axis=1)
            best_ids = np.take_along_axis(best_ids, keep, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_ids, order, axis=1)


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, query_ids: np.ndarray | None, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / |exact top-k|.

    When the queries are vectors of the index (`query_ids` given) each query's own id is removed
    from both lists first: finding itself is free and would flatter the index. A shard of one
    vector has no neighbour to find (and no query left to check): nothing is missed, recall 1.
    """
    total = 0.0
    for row in range(len(exact_ids)):
        own = query_ids[row] if query_ids is not None else None
        exact = [i for i in exact_ids[row] if i != own and i >= 0][:k]
        approx = [i for i in approx_ids[row] if i != own and i >= 0][:k]
        total += len(set(exact) & set(approx)) / len(exact) if exact else 1.0
    return total / len(exact_ids) if len(exact_ids) else 1.0
