"""Which embeddings rows each shard task reads: the driver's read plan.

Embed tasks write vectors in sha256 order, so every embeddings row group holds images of every
category. The driver locates every stored vector from the cache's sha256 column alone
(`locate_vectors`); `plan_vector_reads` then either routes the rows (several shards: `RouteTask`s,
run by `pipelines.index.tasks.run_route_task`, read each needed row group once and write each row
to its shard's routed file) or, for a single shard, lets its task read just the row groups holding
its rows (`ParquetSlice`s).

This module runs on the driver and must never read a vector (only footers and sha256 columns).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.config import S3Settings
from pipelines.layout import routed_vectors_key
from pipelines.storage import Storage


@dataclass
class ParquetSlice:
    """Some row groups (None: all) of one Parquet file with `sha256` and `vector` columns."""
    key: str
    row_groups: list[int] | None = None


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


ROUTE_ROWS_PER_TASK = 100_000   # embeddings rows (whole row groups) one route task reads


def locate_vectors(storage: Storage, embeddings_key_prefix: str, threads: int = 16) -> tuple[list[str], pa.Table]:
    """(embeddings part keys, one row per stored vector: sha256, part, row_group, row).

    Reads only each part's footer and sha256 column, never the vectors (on S3: ranged GETs)."""
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


