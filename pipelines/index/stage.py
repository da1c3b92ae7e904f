"""Build stage: turn one run's deduplicated images and their embeddings into sharded FAISS indexes.

    dedup/<run_id>/images.parquet + embeddings/<model_version>/  ->  indexes/<name>/<snapshot_id>/
        shards/<shard_id>.faiss    one FAISS index per shard (inner product on L2-normalised vectors)
        idmaps/<shard_id>.parquet  vector id -> every product that shares the image (schemas.tables.INDEX_IDMAP)
        _build.json                what was built, with checksums and measured recall (publish reads it)

How it is cut up:

* `plan_shards` packs categories into shards of at most `max_vectors_per_shard` vectors so that
  a category lives in as few shards as possible (one, unless it alone is bigger than a shard).
  The unit of indexing is a distinct (category, canonical image): a category-filtered search and
  a category backfill touch only that category's shards.
* `choose_index_type` picks, per shard, the most exact index that fits the per-shard memory
  budget: Flat (small shards), HNSW, IVF-Flat, IVF-SQ8, IVF-PQ. IVF indexes are trained on a
  sample; their nprobe (HNSW: efSearch) is tuned on held-out vectors to `target_recall`.
* `build_shard` (a plain function: tests and the benchmark call it directly) builds one shard
  from any `VectorSource` and measures recall@10 against exact search on held-out vectors.
  `run_shard_task` is the one-Spark-task-per-shard wrapper around it.
* A shard task reads only its own vectors. The driver locates every vector from the embeddings
  cache's sha256 column alone (`locate_vectors`); `plan_vector_reads` then either routes the rows
  (several shards: one pass of route tasks reads each needed row group once and writes each row to
  its shard's staged file) or, for a single shard, lets its task read just the row groups holding
  its rows. Parquet is read by row group and column, with ranged reads on S3.
* `build_index` is the driver: plan, dispatch with `pipelines.spark.run_tasks`, write `_build.json`,
  and raise `IndexCheckFailed` when a shard's recall is under `min_recall`, so nothing is published.

This module must never write `manifest.json` or `LATEST` (only `pipelines.publish` makes a build
visible to readers), never modify a published snapshot, and never hold a whole shard's vectors
in anonymous memory: they are staged in a local file and read back in chunks.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.config import S3Settings, Settings, IndexSettings
from pipelines import layout
from pipelines.layout import check_run_id
from pipelines.dedup import with_valid_canonicals
from pipelines.readers import quarantined_sha256s
from pipelines.storage import Storage, open_storage
from schemas.tables import INDEX_IDMAP, QUARANTINE
from pipelines.errors import StageRefused
from pipelines.snapshot import (BUILD_FILE, METRIC, MODEL_PCA_PATH, RECALL_K, apply_search_params,  # noqa: F401
                                shard_idmap_path, shard_index_path)



# IndexSettings lives in pipelines.config (the `index:` section of Settings).


def index_settings_from(settings: Settings) -> IndexSettings:
    """The `index:` section; defaults until Settings carries one."""
    section = getattr(settings, "index", None)
    if isinstance(section, IndexSettings):
        return section
    if hasattr(section, "model_dump"):  # the same fields declared in pipelines.config
        section = section.model_dump()
    return IndexSettings.model_validate(section or {})


class IndexBuildError(StageRefused, ValueError):
    """The build cannot start or continue; the message says what to fix."""

    exit_code = 2  # the CLI has always answered these with 2: fix the input (run id, snapshot id) and rerun


class IndexCheckFailed(StageRefused):
    """A shard's measured recall@10 is below `index.min_recall`: the build is not publishable."""

    def __init__(self, message: str, failing: list[dict]):
        super().__init__(message)
        self.failing = failing


# ------------------------------------------------------------------------------------------
# warehouse keys (indexes/<name>/...)
# ------------------------------------------------------------------------------------------

index_prefix, snapshot_prefix, latest_key = layout.index_prefix, layout.snapshot_prefix, layout.latest_key
dedup_images_key, embeddings_prefix = layout.dedup_images_key, layout.embeddings_prefix


def new_snapshot_id(now: datetime | None = None) -> str:
    """UTC time to the millisecond plus 4 random hex digits: ids sort in build order and never collide
    (`20261123T031512.048Z-3f9a`)."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


# ------------------------------------------------------------------------------------------
# shard planning
# ------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------
# index type choice
# ------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------
# vector sources: a shard's vectors, read in chunks
# ------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------
# one shard: train, add, tune, check
# ------------------------------------------------------------------------------------------

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


def exact_top_k(source: VectorSource, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over a source, chunk by chunk (bounded memory)."""
    import faiss

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
    import faiss

    try:
        return int(faiss.get_num_gpus())
    except AttributeError:  # faiss-cpu builds may lack the symbol
        return 0


def _train_and_add(index, choice: IndexChoice, source: VectorSource, train: np.ndarray, cfg: IndexSettings) -> tuple[Any, str]:
    """Train (IVF only) and add every vector; on a GPU when faiss-gpu sees one, else on the CPU."""
    import faiss

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
    import faiss

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
    return ShardBuild(index=index, choice=choice, search_params=params, recall_at_10=round(recall, 4),
                      tuning=tuning, train_vectors=train_size, recall_queries=len(check_ids),
                      build_seconds=round(time.perf_counter() - started, 2), device=device)


# ------------------------------------------------------------------------------------------
# Spark tasks: one per shard
# ------------------------------------------------------------------------------------------

@dataclass
class ParquetSlice:
    """Some row groups (None: all) of one Parquet file with `sha256` and `vector` columns."""
    key: str
    row_groups: list[int] | None = None


@dataclass
class ShardTask:
    """Build one shard from its staged member rows and the files that hold its vectors (see
    `plan_vector_reads`); upload the index and the id map."""
    warehouse: str
    s3: S3Settings
    snapshot_prefix: str
    shard_id: str
    categories: list[str]
    members_key: str
    vector_files: list[ParquetSlice]
    cfg: IndexSettings
    threads: int


@dataclass
class RouteTask:
    """Read some embeddings row groups once; write each wanted row to the routed file of every shard
    that indexes it (`<staging>vectors/<shard_id>/route-<number>.parquet`)."""
    warehouse: str
    s3: S3Settings
    number: int
    staging_prefix: str
    shard_ids: list[str]
    reads: list[tuple[str, int, np.ndarray, np.ndarray]]  # (key, row group, rows in it, shard number of each)


@dataclass
class CopyTask:
    """Reuse a shard of an earlier snapshot byte for byte (category backfill)."""
    warehouse: str
    s3: S3Settings
    snapshot_prefix: str
    source_prefix: str
    shard: dict  # the shard's entry in the earlier manifest


def file_record(path: str, data_path: str | os.PathLike | None = None, data: bytes | None = None) -> dict:
    """{path, bytes, sha256} of a file about to be uploaded."""
    hasher = hashlib.sha256()
    size = 0
    if data is not None:
        hasher.update(data)
        size = len(data)
    else:
        with open(data_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
                size += len(block)
    return {"path": path, "bytes": size, "sha256": hasher.hexdigest()}


def _task_scratch_dir() -> str:
    """Executor-local scratch space (Spark's local dirs when inside a task)."""
    for name in ("SPARK_LOCAL_DIRS", "LOCAL_DIRS"):
        value = os.environ.get(name)
        if value:
            first = value.split(",")[0]
            if os.path.isdir(first):
                return first
    return tempfile.gettempdir()


def read_vector_row_groups(storage: Storage, piece: ParquetSlice) -> Iterator[tuple[int, pa.Table]]:
    """(row group number, its sha256 and vector columns) for each row group of a slice, one at a time:
    never a whole file in memory, and on S3 only those row groups' column chunks are fetched.
    Every read of vectors in a build goes through here."""
    import pyarrow.parquet as pq

    with storage.open_input(piece.key) as handle:
        parquet = pq.ParquetFile(handle)
        groups = range(parquet.num_row_groups) if piece.row_groups is None else piece.row_groups
        for group in groups:
            yield group, parquet.read_row_group(group, columns=["sha256", "vector"])


def _stage_shard_vectors(storage: Storage, vector_files: list[ParquetSlice], shas: np.ndarray,
                         path: str) -> tuple[FileVectors, np.ndarray]:
    """Write the vectors of `shas` (sorted) to `path` in that order; return them and the found mask.

    Reads only `vector_files` (the driver's plan: this shard's routed rows, or the embeddings row
    groups that hold its rows), one row group at a time.
    """
    position_of = {sha: number for number, sha in enumerate(shas.tolist())}  # hashed once, not per row group
    found = np.zeros(len(shas), dtype=bool)
    dim = 0
    with open(path, "wb") as handle:
        fd = handle.fileno()
        for piece in vector_files:
            for _, part in read_vector_row_groups(storage, piece):
                rows = np.array([position_of.get(sha, -1) for sha in part.column("sha256").to_pylist()], dtype=np.int64)
                mask = rows >= 0
                if not mask.any():
                    continue
                part, rows = part.filter(pa.array(mask)), rows[mask]
                vectors = part.column("vector").combine_chunks()
                lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
                if dim == 0:
                    dim = int(lengths[0])
                if (lengths != dim).any():
                    raise IndexBuildError(f"{storage.uri_for(piece.key)} holds vectors of lengths "
                                          f"{sorted(set(lengths.tolist()))}; expected {dim} everywhere: one model "
                                          "version must give one dimension")
                values = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
                for row, position in enumerate(rows):
                    if found[position]:
                        continue  # the cache should hold one vector per image; keep the first
                    found[position] = True
                    os.pwrite(fd, values[row].tobytes(), int(position) * 4 * dim)
    return FileVectors(path, len(shas), max(dim, 1)), found


def run_shard_task(task: ShardTask | CopyTask) -> dict:
    """Spark task body: build (or copy) one shard and upload its files. Returns its manifest entry."""
    storage = open_storage(task.warehouse, task.s3)
    if isinstance(task, CopyTask):
        return _copy_shard(storage, task)
    members = storage.read_table(task.members_key)
    shas = np.array(sorted(set(members.column("sha256").to_pylist())), dtype=object)
    scratch = tempfile.mkdtemp(prefix=f"{task.shard_id}-", dir=_task_scratch_dir())
    try:
        staged, found = _stage_shard_vectors(storage, task.vector_files, shas, os.path.join(scratch, "staged.f32"))
        missing = shas[~found].tolist()
        if missing:
            # Compact to the vectors we have, so that vector ids are 0..n-1 without holes.
            compact = os.path.join(scratch, "vectors.f32")
            keep = np.flatnonzero(found)
            with open(compact, "wb") as handle:
                for start in range(0, len(keep), 65536):
                    handle.write(staged.take(keep[start:start + 65536]).tobytes())
            source = FileVectors(compact, len(keep), staged.dim)
            shas = shas[found]
        else:
            source = staged
        if source.count == 0:
            return {"shard_id": task.shard_id, "categories": task.categories, "vectors": 0,
                    "missing_embeddings": missing}
        built = build_shard(source, task.cfg, threads=task.threads)
        import faiss

        index_path = os.path.join(scratch, "index.faiss")
        faiss.write_index(built.index, index_path)
        idmap = _idmap_table(members, shas)
        idmap_bytes = _table_bytes(idmap)
        index_file = file_record(shard_index_path(task.shard_id), data_path=index_path)
        idmap_file = file_record(shard_idmap_path(task.shard_id), data=idmap_bytes)
        storage.upload_file(index_path, task.snapshot_prefix + index_file["path"])
        storage.write_bytes(task.snapshot_prefix + idmap_file["path"], idmap_bytes)
        return {
            "shard_id": task.shard_id,
            "categories": task.categories,
            "index_type": built.choice.kind,
            "faiss_factory": built.choice.factory,
            "search_params": built.search_params,
            "vectors": int(built.index.ntotal),
            "dimension": source.dim,
            "products": pc.count_distinct(idmap.column("product_id")).as_py(),
            "idmap_rows": idmap.num_rows,
            "recall_at_10": built.recall_at_10,
            "recall_queries": built.recall_queries,
            "tuning": built.tuning,
            "train_vectors": built.train_vectors,
            "estimated_memory_bytes": built.choice.estimated_bytes,
            "build_seconds": built.build_seconds,
            "device": built.device,
            "files": {"index": index_file, "idmap": idmap_file},
            "missing_embeddings": missing,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _idmap_table(members: pa.Table, shas: np.ndarray) -> pa.Table:
    """INDEX_IDMAP rows for the vectors that were indexed, vector id = position in `shas`
    (columnar: a million-product shard never becomes a million Python dicts)."""
    vector_id = pc.index_in(members.column("sha256"), value_set=pa.array(shas.tolist(), type=pa.string()))
    table = members.append_column("vector_id", vector_id.cast(pa.int64())).filter(vector_id.is_valid())
    table = table.sort_by([("vector_id", "ascending"), ("product_id", "ascending")])
    return pa.table([table.column(f.name).cast(f.type) for f in INDEX_IDMAP], schema=INDEX_IDMAP)


def _table_bytes(table: pa.Table) -> bytes:
    import io

    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _copy_shard(storage: Storage, task: CopyTask) -> dict:
    shard = dict(task.shard)
    with tempfile.TemporaryDirectory(prefix="reuse-", dir=_task_scratch_dir()) as scratch:
        for record in shard["files"].values():
            local = os.path.join(scratch, "file")
            storage.download_file(task.source_prefix + record["path"], local)  # shards can be GBs: not in RAM
            copied = file_record(record["path"], data_path=local)
            if (copied["sha256"], copied["bytes"]) != (record["sha256"], record["bytes"]):
                raise IndexBuildError(f"{storage.uri_for(task.source_prefix + record['path'])} does not match its "
                                      "manifest checksum, so it cannot be reused: run a full build (without --categories)")
            storage.upload_file(local, task.snapshot_prefix + record["path"])
    shard["reused_from"] = shard.get("reused_from") or task.source_prefix.rstrip("/").rsplit("/", 1)[-1]
    shard["missing_embeddings"] = []
    return shard


# ------------------------------------------------------------------------------------------
# which rows each shard task reads: locate every vector once, route rows to their shards
# ------------------------------------------------------------------------------------------

ROUTE_ROWS_PER_TASK = 100_000   # embeddings rows (whole row groups) one route task reads
ROUTE_FLUSH_BYTES = 64 << 20    # a route task holds at most about this much before writing
ROUTED_SCHEMA = pa.schema([("sha256", pa.string()), ("vector", pa.list_(pa.float32()))])


def locate_vectors(storage: Storage, embeddings_key_prefix: str, threads: int = 16) -> tuple[list[str], pa.Table]:
    """(embeddings part keys, one row per stored vector: sha256, part, row_group, row).

    Reads only each part's footer and sha256 column, never the vectors (on S3: ranged GETs)."""
    import pyarrow.parquet as pq
    from concurrent.futures import ThreadPoolExecutor

    keys = sorted(k for k in storage.list(embeddings_key_prefix) if k.endswith(".parquet"))

    def read(number: int) -> list[pa.Table]:
        with storage.open_input(keys[number]) as handle:
            parquet = pq.ParquetFile(handle)
            pieces = []
            for group in range(parquet.num_row_groups):
                shas = parquet.read_row_group(group, columns=["sha256"]).column(0).cast(pa.string())
                count = len(shas)
                pieces.append(pa.table({"sha256": shas, "part": np.full(count, number, dtype=np.int32),
                                        "row_group": np.full(count, group, dtype=np.int32),
                                        "row": np.arange(count, dtype=np.int32)}))
            return pieces

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(keys)))) as pool:
        pieces = [piece for found in pool.map(read, range(len(keys))) for piece in found]
    schema = pa.schema([("sha256", pa.string()), ("part", pa.int32()), ("row_group", pa.int32()), ("row", pa.int32())])
    return keys, pa.concat_tables(pieces) if pieces else schema.empty_table()


@dataclass
class VectorReads:
    """The driver's plan for getting every shard's vectors to its task."""
    mode: str                                  # direct | routed
    shard_files: dict[str, list[ParquetSlice]]
    route_tasks: list[RouteTask]
    row_groups_read: int                       # embeddings row groups whose vectors are read
    rows_read: int                             # embeddings rows in them

    def describe(self) -> dict:
        return {"mode": self.mode, "route_tasks": len(self.route_tasks),
                "embeddings_row_groups_read": self.row_groups_read, "embeddings_rows_read": self.rows_read}


def plan_vector_reads(keys: list[str], located: pa.Table, shard_shas: dict[str, pa.Array], staging_prefix: str,
                      warehouse: str, s3: S3Settings) -> VectorReads:
    """Decide which embeddings rows each shard task reads.

    Embed tasks write vectors in sha256 order, so every embeddings row group holds images of every
    category: a shard task reading its own rows straight from the cache would read nearly all of it.
    So with several shards, each row group that holds a wanted vector is read once, by a route task,
    which writes every wanted row to the routed files of the shards that index it; a shard task then
    reads exactly its rows. With one shard (a one-category backfill, a small catalog) the task reads
    the row groups that hold its rows directly. Row groups holding no wanted vector (images no
    longer in the catalog) are never read. An image stored twice is read from its first copy.
    """
    part = located.column("part").to_numpy()
    group = located.column("row_group").to_numpy()
    row = located.column("row").to_numpy()
    group_key = (part.astype(np.int64) << 32) | group
    keys_of_groups, group_rows = np.unique(group_key, return_counts=True)
    rows_in_group = dict(zip(keys_of_groups.tolist(), group_rows.tolist()))

    wanted = pa.concat_arrays([pa.array(shas, type=pa.string()) for shas in shard_shas.values()])
    numbers = np.concatenate([np.full(len(shas), number, dtype=np.int32)
                              for number, shas in enumerate(shard_shas.values())])
    found = pc.index_in(wanted, value_set=located.column("sha256"))  # the first stored copy of each image
    stored = found.is_valid().to_numpy(zero_copy_only=False)
    position = found.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)[stored]
    shard_of = numbers[stored]
    needed_groups = np.unique(group_key[position])
    rows_read = sum(rows_in_group[g] for g in needed_groups.tolist())

    def split(key: int) -> tuple[str, int]:
        return keys[key >> 32], key & 0xFFFFFFFF

    if len(shard_shas) == 1:
        files: dict[str, list[int]] = {}
        for key in needed_groups.tolist():
            name, number = split(key)
            files.setdefault(name, []).append(number)
        shard_id = next(iter(shard_shas))
        return VectorReads("direct", {shard_id: [ParquetSlice(k, sorted(v)) for k, v in sorted(files.items())]},
                           [], len(needed_groups), rows_read)

    order = np.lexsort((row[position], group_key[position]))
    position, shard_of = position[order], shard_of[order]
    starts = np.flatnonzero(np.r_[True, np.diff(group_key[position]) != 0])
    bounds = list(zip(starts.tolist(), starts[1:].tolist() + [len(position)]))
    shard_ids = list(shard_shas)
    route_tasks: list[RouteTask] = []
    reads: list[tuple[str, int, np.ndarray, np.ndarray]] = []
    budget = 0
    for start, stop in bounds:
        key = int(group_key[position[start]])
        name, number = split(key)
        reads.append((name, number, row[position[start:stop]].astype(np.int32), shard_of[start:stop]))
        budget += rows_in_group[key]
        if budget >= ROUTE_ROWS_PER_TASK:
            route_tasks.append(RouteTask(warehouse, s3, len(route_tasks), staging_prefix, shard_ids, reads))
            reads, budget = [], 0
    if reads:
        route_tasks.append(RouteTask(warehouse, s3, len(route_tasks), staging_prefix, shard_ids, reads))
    shard_files: dict[str, list[ParquetSlice]] = {shard_id: [] for shard_id in shard_ids}
    for task in route_tasks:
        for number in sorted({int(n) for _, _, _, shards in task.reads for n in np.unique(shards)}):
            shard_files[shard_ids[number]].append(ParquetSlice(routed_vectors_key(staging_prefix, shard_ids[number],
                                                                                  task.number)))
    return VectorReads("routed", shard_files, route_tasks, len(needed_groups), rows_read)


def routed_vectors_key(staging_prefix: str, shard_id: str, route_task: int) -> str:
    return f"{staging_prefix}vectors/{shard_id}/route-{route_task:05d}.parquet"


def run_route_task(task: RouteTask) -> dict:
    """Spark task body: read this task's embeddings row groups once and write each wanted row to the
    routed file of its shard(s)."""
    import pyarrow.parquet as pq

    storage = open_storage(task.warehouse, task.s3)
    scratch = tempfile.mkdtemp(prefix=f"route-{task.number}-", dir=_task_scratch_dir())
    writers: dict[int, Any] = {}
    buffered: dict[int, list[pa.Table]] = {}
    routed = 0

    def flush(shard: int) -> None:
        tables = buffered.pop(shard, [])
        if not tables:
            return
        if shard not in writers:
            writers[shard] = pq.ParquetWriter(os.path.join(scratch, f"{shard}.parquet"), ROUTED_SCHEMA,
                                              compression="lz4")
        writers[shard].write_table(pa.concat_tables(tables))

    try:
        by_key: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        for key, group, rows, shards in task.reads:
            by_key.setdefault(key, {})[group] = (rows, shards)
        for key, groups in by_key.items():
            for group, table in read_vector_row_groups(storage, ParquetSlice(key, sorted(groups))):
                rows, shards = groups[group]
                table = table.take(pa.array(rows))
                table = pa.table({"sha256": table.column("sha256").cast(pa.string()),
                                  "vector": table.column("vector").cast(pa.list_(pa.float32()))}, schema=ROUTED_SCHEMA)
                routed += table.num_rows
                for shard in np.unique(shards).tolist():
                    buffered.setdefault(shard, []).append(table.filter(pa.array(shards == shard)))
                if sum(t.nbytes for tables in buffered.values() for t in tables) >= ROUTE_FLUSH_BYTES:
                    for shard in list(buffered):  # bounded memory however many shards there are
                        flush(shard)
        for shard in list(buffered):
            flush(shard)
        for shard, writer in writers.items():
            writer.close()
            storage.upload_file(os.path.join(scratch, f"{shard}.parquet"),
                                routed_vectors_key(task.staging_prefix, task.shard_ids[shard], task.number))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"route_task": task.number, "rows": routed}


# ------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------

@dataclass
class BuildResult:
    snapshot_id: str
    index_name: str
    run_id: str
    status: str                 # passed | failed_recall_check
    shards: list[dict]
    vectors: int
    products: int
    missing_embeddings: int
    reused_shards: int
    seconds: float
    report: dict = field(repr=False, default_factory=dict)


def latest_dedup_run(storage: Storage) -> str:
    runs = [run for run in storage.list_dirs("dedup") if storage.exists(dedup_images_key(run))
            or storage.list(dedup_images_key(run) + "/")]
    if not runs:
        raise IndexBuildError(f"no dedup output under {storage.uri_for('dedup/')}: run the dedup stage first "
                              "or pass --run-id")
    return sorted(runs)[-1]


def read_dedup_members(storage: Storage, run_id: str) -> pa.Table:
    """Distinct (category, canonical image, product) rows of a dedup run: what the id maps hold."""
    key = dedup_images_key(run_id)
    if storage.exists(key):
        table = storage.read_table(key)
    elif storage.list(key + "/"):
        table = storage.read_table(key + "/")  # written as a directory of parts
    else:
        raise IndexBuildError(f"{storage.uri_for(key)} does not exist: run dedup for run {run_id} first "
                              "(or pick another --run-id)")
    needed = ["product_id", "category", "image_url", "title", "canonical_sha256"]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise IndexBuildError(f"{storage.uri_for(key)} lacks column(s) {', '.join(missing)} "
                              f"(found: {', '.join(table.column_names)}); see schemas/tables.py DEDUP_IMAGES")
    # Images the validate stage quarantined (as images or as embeddings) are accounted for
    # there; they are not indexed and must not count as missing vectors here. A cluster whose
    # canonical image was rejected is represented by its best valid member, as the embed stage
    # chose it (pipelines.dedup.with_valid_canonicals).
    frame = table.to_pandas()
    rejected_images = quarantined_sha256s(storage, run_id, "images")
    if {"sha256", "cluster_id", "width", "height", "fetched_at"} <= set(frame.columns):
        frame = with_valid_canonicals(frame, rejected_images)
    else:  # a hand-made table without the canonical rule's inputs
        frame = frame[~frame["canonical_sha256"].isin(rejected_images)]
    frame = frame[needed].rename(columns={"canonical_sha256": "sha256"})
    frame = frame[~frame["sha256"].isin(quarantined_sha256s(storage, run_id, "embeddings"))]
    # One row per (category, image, product): a product with two copies of one picture is one hit.
    frame = frame.sort_values(["category", "sha256", "product_id", "image_url"])
    frame = frame.drop_duplicates(["category", "sha256", "product_id"]).reset_index(drop=True)
    return pa.Table.from_pandas(frame, preserve_index=False)


def _staging_prefix(snapshot_prefix_: str) -> str:
    return snapshot_prefix_ + "_staging/"


def _plan_members(members: pa.Table, plan: ShardPlan) -> pa.Table:
    """The member rows (product -> canonical image) of one planned shard."""
    rows = members.filter(pc.is_in(members.column("category"), value_set=pa.array(plan.categories)))
    if plan.parts > 1:
        shas = sorted(set(rows.column("sha256").to_pylist()))
        mine = np.array_split(np.array(shas, dtype=object), plan.parts)[plan.part]
        rows = rows.filter(pc.is_in(rows.column("sha256"), value_set=pa.array(mine.tolist(), type=pa.string())))
    return rows


def _members_digest(rows: pa.Table) -> str:
    """Fingerprint of a shard's member rows, whatever their order: what the shard is built from
    (with the model version, whose vectors are immutable, and the index settings)."""
    from pipelines.fingerprint import rows_digest

    return rows_digest(rows, rows.column_names)


def _unchanged_shards(storage: Storage, cfg: IndexSettings, version: str, plans: list[ShardPlan],
                      digests: dict[str, str]):
    """(live snapshot id, [(plan, its unchanged shard there)], dimension), or None: the shards of
    the snapshot `LATEST` points to that have the same categories and member rows as a planned
    shard, built with the same model version and index settings."""
    from pipelines.publish import read_latest, read_manifest

    pointer = read_latest(storage, cfg.name)
    if pointer is None:
        return None
    previous_id = pointer["snapshot_id"]
    build_key = snapshot_prefix(cfg.name, previous_id) + BUILD_FILE
    build = json.loads(storage.read_text(build_key)) if storage.exists(build_key) else {}
    ignore = {"keep_snapshots", "reuse_unchanged_shards", "min_recall", "use_gpu"}
    if {k: v for k, v in (build.get("settings") or {}).items() if k not in ignore} != \
            {k: v for k, v in cfg.model_dump().items() if k not in ignore}:
        return None
    previous = read_manifest(storage, cfg.name, previous_id)
    if previous["model"]["version"] != version:
        return None
    by_content = {(tuple(s["categories"]), s.get("members_sha256")): s for s in previous["shards"]
                  if s.get("members_sha256")}
    kept = [(plan, by_content[(tuple(plan.categories), digests[plan.shard_id])]) for plan in plans
            if (tuple(plan.categories), digests[plan.shard_id]) in by_content]
    return (previous_id, kept, previous["dimension"]) if kept else None


def build_index(settings: Settings, run_id: str | None = None, *, model: Any = None,
                categories: Sequence[str] | None = None, cfg: IndexSettings | None = None,
                runner: str = "spark", spark=None, snapshot_id: str | None = None) -> BuildResult:
    """Build every shard of a new snapshot directory for `run_id` (default: the newest dedup run).

    `model` is the embedding model: a `pipelines.model.ModelSpec`, or its `describe()` dict (at
    least `version`); default: the installed production model. `spark` is a SparkSession or a
    factory for one, called only once the inputs have been checked. With `categories` (a
    backfill), only the shards holding those categories are rebuilt; every other shard of the
    snapshot `LATEST` points to is copied byte for byte. Raises IndexCheckFailed (after writing
    `_build.json`) when any rebuilt shard's recall@10 is under `min_recall`.
    """
    from pipelines.publish import read_latest, read_manifest

    started = time.perf_counter()
    cfg = cfg or index_settings_from(settings)
    storage = open_storage(settings.warehouse, settings.s3)
    run_id = check_run_id(run_id) if run_id else latest_dedup_run(storage)
    model_info, model_files = _describe_model(model)
    version = model_info["version"]
    emb_prefix = embeddings_prefix(version)
    if not any(k.endswith(".parquet") for k in storage.list(emb_prefix)):
        found = storage.list_dirs("embeddings")
        raise IndexBuildError(f"no embeddings for model version {version} under {storage.uri_for(emb_prefix)} "
                              f"(versions present: {', '.join(found) or 'none'}): run the embed stage for this "
                              "model first, or pass --model-version to index another version's vectors")
    members = read_dedup_members(storage, run_id)
    start_pointer = read_latest(storage, cfg.name)  # the base publish moves LATEST from (compare-and-swap)
    snapshot_id = snapshot_id or new_snapshot_id()
    prefix = snapshot_prefix(cfg.name, snapshot_id)

    reused: list[dict] = []
    previous_id = None
    previous_dimension = None
    first_number = 0
    if categories:
        pointer = read_latest(storage, cfg.name)
        if pointer is None:
            raise IndexBuildError(f"a category backfill needs a published snapshot of index {cfg.name!r} to reuse; "
                                  "none is published yet: run a full build-index and publish first")
        previous_id = pointer["snapshot_id"]
        previous = read_manifest(storage, cfg.name, previous_id)
        if previous["model"]["version"] != version:
            raise IndexBuildError(f"snapshot {previous_id} was built with model {previous['model']['version']}, this "
                                  f"build uses {version}: shards of two models cannot be mixed, run a full build")
        previous_dimension = previous["dimension"]
        rebuild = set(categories)
        for shard in previous["shards"]:
            if rebuild.isdisjoint(shard["categories"]):
                reused.append(shard)
            else:
                rebuild.update(shard["categories"])  # a co-packed category is rebuilt with its shard
        first_number = 1 + max((int(s["shard_id"].rsplit("-", 1)[-1]) for s in previous["shards"]), default=-1)
        members = members.filter(pc.is_in(members.column("category"), value_set=pa.array(sorted(rebuild))))

    pairs = members.group_by(["category", "sha256"]).aggregate([])
    counts = pairs.group_by("category").aggregate([("sha256", "count")])
    category_vectors = dict(zip(counts.column("category").to_pylist(), counts.column("sha256_count").to_pylist()))
    plans = plan_shards(category_vectors, cfg.max_vectors_per_shard, first_number)
    if not plans and not reused:
        raise IndexBuildError(f"dedup run {run_id} has no images to index"
                              + (f" in categories {', '.join(sorted(categories))}" if categories else ""))
    plan_rows = {plan.shard_id: _plan_members(members, plan) for plan in plans}
    members_digests = {shard_id: _members_digest(rows) for shard_id, rows in plan_rows.items()}
    if not categories and cfg.reuse_unchanged_shards:
        unchanged = _unchanged_shards(storage, cfg, version, plans, members_digests)
        if unchanged is not None:
            previous_id, kept, previous_dimension = unchanged
            reused = [shard for _, shard in kept]
            kept_ids = {plan.shard_id for plan, _ in kept}
            plans = [plan for plan in plans if plan.shard_id not in kept_ids]
            # Rebuilt shards get ids the kept ones do not have (a kept shard keeps its id).
            taken = {shard["shard_id"] for shard in reused}
            number = 1 + max(int(s.rsplit("-", 1)[-1]) for s in taken) if taken else 0
            for plan in plans:
                if plan.shard_id in taken:
                    new_id = f"shard-{number:04d}"
                    number += 1
                    plan_rows[new_id], members_digests[new_id] = plan_rows.pop(plan.shard_id), members_digests.pop(plan.shard_id)
                    plan.shard_id = new_id

    staging = _staging_prefix(prefix)
    tasks: list[ShardTask | CopyTask] = []
    shard_shas: dict[str, pa.Array] = {}
    for plan in plans:
        rows = plan_rows[plan.shard_id]
        members_key = f"{staging}members-{plan.shard_id}.parquet"
        storage.write_table(members_key, rows)
        shard_shas[plan.shard_id] = pc.unique(rows.column("sha256"))
        tasks.append(ShardTask(settings.warehouse, settings.s3, prefix, plan.shard_id, plan.categories,
                               members_key, [], cfg, threads=1))
    reads = None
    if plans:
        reads = plan_vector_reads(*locate_vectors(storage, emb_prefix), shard_shas, staging, settings.warehouse,
                                  settings.s3)
        for task in tasks:
            task.vector_files = reads.shard_files[task.shard_id]
    previous_prefix = snapshot_prefix(cfg.name, previous_id) if previous_id else ""
    tasks.extend(CopyTask(settings.warehouse, settings.s3, prefix, previous_prefix, shard) for shard in reused)
    for path, data in model_files.items():
        storage.write_bytes(prefix + path, data)

    session = (spark() if callable(spark) else spark) if runner == "spark" else None
    threads = _threads_per_task(session, sum(isinstance(t, ShardTask) for t in tasks))
    for task in tasks:
        if isinstance(task, ShardTask):
            task.threads = threads
    try:
        if reads is not None and reads.route_tasks:
            run_tasks_for_index(reads.route_tasks, runner, session, f"route vectors to {len(plans)} shards",
                                fn=run_route_task)
        results = run_tasks_for_index(tasks, runner, session, f"build {len(plans)} index shards"
                                      + (f", reuse {len(reused)}" if reused else ""))
    finally:
        storage.delete_prefix(staging)
    shards = sorted((r for r in results if r.get("vectors")), key=lambda s: s["shard_id"])
    missing = sorted({sha for r in results for sha in r.get("missing_embeddings", [])})
    for shard in shards:
        shard.pop("missing_embeddings", None)
        if "reused_from" not in shard and not missing:
            shard["members_sha256"] = members_digests.get(shard["shard_id"])
    if missing:
        _quarantine_missing(storage, run_id, members, missing)
    dimensions = {s["dimension"] for s in shards if "dimension" in s} | (
        {previous_dimension} if previous_dimension else set())
    if len(dimensions) != 1:
        raise IndexBuildError(f"shards of this build have dimensions {sorted(dimensions)}: the embeddings of one "
                              "model version must all have one length; re-embed with a single model")
    failing = [s for s in shards if "reused_from" not in s and s["recall_at_10"] < cfg.min_recall]
    status = "failed_recall_check" if failing else "passed"
    report = {
        "build_version": 1,
        "snapshot_id": snapshot_id,
        "index_name": cfg.name,
        "status": status,
        "source_run_id": run_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {**model_info, "dim": model_info.get("dim") or dimensions.copy().pop()},
        "model_files": [file_record(path, data=data) for path, data in sorted(model_files.items())],
        "dimension": dimensions.pop(),
        "metric": METRIC,
        "settings": cfg.model_dump(),
        "backfill": {"categories": sorted(categories), "base_snapshot": previous_id} if categories else None,
        "base_snapshot": previous_id or (start_pointer["snapshot_id"] if start_pointer else None),
        "missing_embeddings": len(missing),
        "vector_reads": reads.describe() if reads is not None else None,
        "shards": shards,
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_text(prefix + BUILD_FILE, json.dumps(report, indent=2, sort_keys=True))
    result = BuildResult(snapshot_id, cfg.name, run_id, status, shards, sum(s["vectors"] for s in shards),
                         sum(s["products"] for s in shards), len(missing), len(reused), report["build_seconds"], report)
    if failing:
        details = ", ".join(f"{s['shard_id']} ({s['faiss_factory']}, {s['vectors']:,} vectors): "
                            f"{s['recall_at_10']:.3f}" for s in failing)
        raise IndexCheckFailed(
            f"recall@10 below index.min_recall={cfg.min_recall} for {details}; snapshot {snapshot_id} will not be "
            "published. Raise index.memory_budget_mb (a more exact index type), raise index.target_recall or "
            "unset a fixed index.nprobe / index.ef_search, then rebuild", failing)
    return result


def _describe_model(model: Any) -> tuple[dict, dict[str, bytes]]:
    """(description for the manifest, files the snapshot must carry to reproduce query vectors)."""
    if model is None:
        from pipelines.embed.model import default_spec

        model = default_spec()
    if isinstance(model, dict):
        if not model.get("version"):
            raise IndexBuildError("the model description needs at least a 'version' (the embeddings/ folder name)")
        return dict(model), {}
    info = model.describe()
    files = {}
    if getattr(model, "pca", None) is not None:
        files[MODEL_PCA_PATH] = model.pca.to_bytes()  # search must apply the same projection to queries
    return info, files


def _threads_per_task(spark, build_tasks: int) -> int:
    """Cores per shard build: on Spark the shard tasks running at once share the cores; the local
    runner builds one shard at a time with every core."""
    if spark is None:
        return os.cpu_count() or 1
    return max(1, spark.sparkContext.defaultParallelism // max(1, build_tasks))


def run_tasks_for_index(tasks: list, runner: str, spark, description: str, fn=None) -> list[dict]:
    from pipelines.spark import run_tasks

    return run_tasks(fn or run_shard_task, tasks, runner=runner, spark=spark, description=description)


def _quarantine_missing(storage: Storage, run_id: str, members: pa.Table, missing: list[str]) -> None:
    """Rows whose canonical image has no vector (the embed stage quarantined it) end here, with a reason."""
    rows = members.filter(pc.is_in(members.column("sha256"), value_set=pa.array(missing)))
    now = datetime.now(timezone.utc)
    table = pa.table({
        "run_id": [run_id] * rows.num_rows,
        "stage": ["index"] * rows.num_rows,
        "reason": ["missing_embedding"] * rows.num_rows,
        "detail": ["no vector for the canonical image in the embeddings cache"] * rows.num_rows,
        "row_index": pa.nulls(rows.num_rows, pa.int64()),
        "product_id": rows.column("product_id"),
        "category": rows.column("category"),
        "image_url": rows.column("image_url"),
        "sha256": rows.column("sha256"),
        "http_status": pa.nulls(rows.num_rows, pa.int32()),
        "at": pa.array([now] * rows.num_rows, type=pa.timestamp("us", tz="UTC")),
    }, schema=QUARANTINE)
    storage.write_table(layout.missing_embedding_quarantine_key(run_id), table)


def model_for_version(version: str | None) -> Any:
    """The model to record for `--model-version`: the installed spec when it is that version,
    else a bare description (such a snapshot is searchable by vector, not by image)."""
    from pipelines.embed.model import default_spec, model_version

    spec = default_spec()
    if version is None or model_version(spec) == version:
        return spec
    return {"name": "unknown", "version": version, "weights_sha256": None, "preprocessing": None, "dim": None}
