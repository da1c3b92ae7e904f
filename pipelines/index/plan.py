"""Shard planning and index type choice: which categories go to which shard, and what FAISS index
each shard gets within the per-shard memory budget.

* `plan_shards` packs categories into shards of at most `max_vectors_per_shard` vectors so that
  a category lives in as few shards as possible (one, unless it alone is bigger than a shard).
  The unit of indexing is a distinct (category, canonical image): a category-filtered search and
  a category backfill touch only that category's shards.
* `choose_index_type` picks, per shard, the most exact index that fits the per-shard memory
  budget: Flat (small shards), HNSW, IVF-Flat, IVF-SQ8, IVF-PQ.
* `_plan_members` selects a planned shard's member rows (a split category by sha256 order).

Pure functions of counts and settings: this module must never read the warehouse or import faiss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import IndexSettings
from pipelines.index.errors import IndexBuildError


@dataclass
class ShardPlan:
    shard_id: str
    categories: list[str]
    vectors: int
    part: int = 0   # a category bigger than a shard is split into `parts` shards, by sha256 order
    parts: int = 1


def plan_shards(category_vectors: dict[str, int], max_vectors_per_shard: int,
                first_shard_number: int = 0) -> list[ShardPlan]:
    """Pack categories into shards of at most `max_vectors_per_shard` vectors.

    A category bigger than a shard gets ceil(n / max) shards of its own; smaller categories are
    packed first-fit-decreasing, so each lives in exactly one shard. Deterministic for a given input.
    """
    plans: list[ShardPlan] = []
    bins: list[ShardPlan] = []
    for category, count in sorted(category_vectors.items(), key=lambda item: (-item[1], item[0])):
        if count <= 0:
            continue
        if count > max_vectors_per_shard:
            parts = math.ceil(count / max_vectors_per_shard)
            base, extra = divmod(count, parts)
            for part in range(parts):
                plans.append(ShardPlan("", [category], base + (part < extra), part, parts))
            continue
        for candidate in bins:
            if candidate.vectors + count <= max_vectors_per_shard:
                candidate.categories.append(category)
                candidate.vectors += count
                break
        else:
            bins.append(ShardPlan("", [category], count))
    plans.extend(bins)
    for number, plan in enumerate(plans, start=first_shard_number):
        plan.shard_id = f"shard-{number:04d}"
        plan.categories.sort()
    return plans


@dataclass
class IndexChoice:
    """What to build for one shard: a faiss index_factory key plus its training/search knobs."""
    kind: str               # flat | hnsw | ivf_flat | ivf_sq8 | ivf_pq
    factory: str            # faiss index_factory string, e.g. "IVF1024,SQ8"
    nlist: int = 0
    pq_m: int = 0
    hnsw_m: int = 0
    estimated_bytes: int = 0


def default_nlist(vectors: int) -> int:
    """About sqrt(n) lists, a power of two: k-means stays cheap and lists hold ~sqrt(n) vectors."""
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(vectors))))
    # faiss wants >= 39 training points per list, and held-out vectors never train: keep ~50 per list
    return int(min(max(nlist, 16), 65536, max(1, vectors // 50)))


def estimate_index_bytes(kind: str, vectors: int, dim: int, nlist: int = 0, pq_m: int = 0, hnsw_m: int = 0) -> int:
    """RAM an index of this kind takes when loaded (the served size), from faiss's storage layout."""
    ids = 8  # IVF lists store an int64 id next to each code
    if kind == "flat":
        return 4 * dim * vectors
    if kind == "hnsw":
        # level-0 links (2M int32) dominate the graph; upper levels add ~1/M of that
        return vectors * (4 * dim + int(8 * hnsw_m * 1.1) + 16)
    centroids = 4 * dim * nlist
    if kind == "ivf_flat":
        return vectors * (4 * dim + ids) + centroids
    if kind == "ivf_sq8":
        return vectors * (dim + ids) + centroids + 8 * dim
    if kind == "ivf_pq":
        # codebooks only: with inner product faiss keeps no precomputed per-list tables
        return vectors * (pq_m + ids) + centroids + 4 * dim * 256
    raise ValueError(f"unknown index kind {kind!r}")


def _pq_sub_quantizers(dim: int, bytes_per_vector: float) -> int:
    """Largest PQ code size (bytes) that divides dim, fits the budget and keeps >= 4 dims per sub-vector
    (narrower sub-vectors add training time and almost no recall)."""
    best = 0
    for m in range(1, dim // 4 + 1):
        if dim % m == 0 and m <= bytes_per_vector:
            best = m
    return best


def choose_index_type(vectors: int, dim: int, cfg: IndexSettings) -> IndexChoice:
    """The most exact index that fits `memory_budget_mb` for a shard of `vectors` vectors."""
    budget = cfg.memory_budget_mb * 1024 * 1024
    nlist = min(cfg.nlist, max(1, vectors)) if cfg.nlist else default_nlist(vectors)

    def make(kind: str, pq_m: int = 0) -> IndexChoice:
        factory = {"flat": "Flat", "hnsw": f"HNSW{cfg.hnsw_m}", "ivf_flat": f"IVF{nlist},Flat",
                   "ivf_sq8": f"IVF{nlist},SQ8", "ivf_pq": f"IVF{nlist},PQ{pq_m}x8"}[kind]
        uses_ivf = kind.startswith("ivf")
        return IndexChoice(kind, factory, nlist=nlist if uses_ivf else 0, pq_m=pq_m,
                           hnsw_m=cfg.hnsw_m if kind == "hnsw" else 0,
                           estimated_bytes=estimate_index_bytes(kind, vectors, dim, nlist if uses_ivf else 0,
                                                                pq_m, cfg.hnsw_m))

    fixed_pq_m = _pq_sub_quantizers(dim, max(1.0, budget / max(vectors, 1) - 8 - 4 * dim * nlist / max(vectors, 1)))
    if cfg.index_type != "auto":
        return make(cfg.index_type, pq_m=max(fixed_pq_m, 1) if cfg.index_type == "ivf_pq" else 0)

    if vectors <= cfg.flat_max_vectors and estimate_index_bytes("flat", vectors, dim) <= budget:
        return make("flat")
    if vectors <= cfg.hnsw_max_vectors and estimate_index_bytes("hnsw", vectors, dim, hnsw_m=cfg.hnsw_m) <= budget:
        return make("hnsw")
    for kind in ("ivf_flat", "ivf_sq8"):
        if estimate_index_bytes(kind, vectors, dim, nlist) <= budget:
            return make(kind)
    # Product quantisation: the only rung whose recall is capped by the code size, not nprobe.
    if fixed_pq_m >= 4 and estimate_index_bytes("ivf_pq", vectors, dim, nlist, fixed_pq_m) <= budget:
        return make("ivf_pq", fixed_pq_m)
    need = estimate_index_bytes("ivf_pq", vectors, dim, nlist, _pq_sub_quantizers(dim, 16) or 4)
    raise IndexBuildError(
        f"a shard of {vectors:,} vectors of dimension {dim} needs at least {need / 2**20:,.0f} MB even as IVF-PQ, "
        f"above index.memory_budget_mb={cfg.memory_budget_mb}: raise the budget or lower "
        f"index.max_vectors_per_shard")


def _plan_members(members: pa.Table, plan: ShardPlan) -> pa.Table:
    """The member rows (product -> canonical image) of one planned shard."""
    rows = members.filter(pc.is_in(members.column("category"), value_set=pa.array(plan.categories)))
    if plan.parts > 1:
        shas = sorted(set(rows.column("sha256").to_pylist()))
        mine = np.array_split(np.array(shas, dtype=object), plan.parts)[plan.part]
        rows = rows.filter(pc.is_in(rows.column("sha256"), value_set=pa.array(mine.tolist(), type=pa.string())))
    return rows
