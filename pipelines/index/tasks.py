"""What runs inside the Spark tasks of a build: build one shard (`run_shard_task`), copy a reused
one (`CopyTask`), route embeddings rows to their shards (`run_route_task`).

A task reads only the vectors the driver planned for it (`pipelines.index.routing`), through
`read_vector_row_groups`: one row group at a time, ranged reads on S3. Task payloads are picklable
dataclasses and task bodies top-level functions. This module must never hold a whole shard's
vectors in anonymous memory (they are staged in a local file and read back in chunks), never
write outside its snapshot's directory and staging area, and never import faiss at import time.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import IndexSettings, S3Settings
from pipelines.index.errors import IndexBuildError
from pipelines.index.routing import ParquetSlice, RouteTask
from pipelines.index.shard import build_shard
from pipelines.index.vectors import FileVectors
from pipelines.layout import routed_vectors_key
from pipelines.snapshot import shard_idmap_path, shard_index_path
from pipelines.storage import SizeMismatch, Storage, open_storage
from schemas.tables import INDEX_IDMAP


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
        import faiss  # here, not at module top: keeps faiss out of import time

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
            "search_latency_ms": built.search_latency_ms,
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
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _copy_shard(storage: Storage, task: CopyTask) -> dict:
    shard = dict(task.shard)
    with tempfile.TemporaryDirectory(prefix="reuse-", dir=_task_scratch_dir()) as scratch:
        for record in shard["files"].values():
            local = os.path.join(scratch, "file")
            try:  # shards can be GBs: not in RAM, and never more on disk than the manifest says
                storage.download_file(task.source_prefix + record["path"], local, expected_bytes=record["bytes"])
                copied = file_record(record["path"], data_path=local)
            except SizeMismatch:
                copied = None
            if copied is None or (copied["sha256"], copied["bytes"]) != (record["sha256"], record["bytes"]):
                raise IndexBuildError(f"{storage.uri_for(task.source_prefix + record['path'])} does not match its "
                                      "manifest checksum, so it cannot be reused: run a full build (without --categories)")
            storage.upload_file(local, task.snapshot_prefix + record["path"])
    shard["reused_from"] = shard.get("reused_from") or task.source_prefix.rstrip("/").rsplit("/", 1)[-1]
    shard["missing_embeddings"] = []
    return shard


ROUTE_FLUSH_BYTES = 64 << 20    # a route task holds at most about this much before writing
ROUTED_SCHEMA = pa.schema([("sha256", pa.string()), ("vector", pa.list_(pa.float32()))])


def run_route_task(task: RouteTask) -> dict:
    """Spark task body: read this task's embeddings row groups once and write each wanted row to the
    routed file of its shard(s)."""
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
