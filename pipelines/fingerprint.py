"""Fingerprints of what a validation reads, so that unchanged inputs are not validated twice.

A stage's validation is a function of its input rows, its suite file and the validation
settings (and, for the manifest, of the categories the previous run knew). When a night's
inputs are the same as an earlier night's, `pipelines.validate` reuses that night's suite
results and quarantine instead of running Great Expectations on Spark again, and says so in
the report (`extra.reused_validation_of`); the gates are evaluated anew either way, since they
also look at the crawl summary and the previous run.

Fingerprints are computed with pyarrow on the driver from the warehouse files themselves (no
Spark query, no GX import): the columns the suite reads, in row-key order, for per-run tables;
the file listing (size and mtime or ETag) for the append-only embeddings cache. Anything that
cannot be fingerprinted is validated normally.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.storage import Storage

# Bump when what a validation computes changes without its suite or settings changing (the
# row filters, the reports' fields): earlier results are then validated again.
MEMO_VERSION = 1


def digest(*parts: Any) -> str:
    """sha256 of the parts as canonical JSON."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def parquet_keys(storage: Storage, key_or_prefix: str) -> list[str]:
    if key_or_prefix.endswith(".parquet"):
        return [key_or_prefix] if storage.exists(key_or_prefix) else []
    return sorted(k for k in storage.list(key_or_prefix) if k.endswith(".parquet"))


def table_digest(storage: Storage, key_or_prefix: str, columns: Iterable[str], *, sort_by: list[str],
                 where: tuple[str, tuple[str, ...]] | None = None) -> str:
    """Digest of the rows of a Parquet table (one file or every file under a prefix), over the
    given columns that the table has (their names are part of it), rows sorted by `sort_by`:
    the same rows written in another order or split into other files give the same digest.
    `where` = (column, values): only rows whose column is one of the values."""
    wanted = list(dict.fromkeys(columns))
    tables = []
    for key in parquet_keys(storage, key_or_prefix):
        parquet = pq.ParquetFile(storage.open_input(key))
        present = [c for c in wanted if c in parquet.schema_arrow.names]
        read = present + ([where[0]] if where and where[0] not in present and where[0] in parquet.schema_arrow.names
                          else [])
        table = parquet.read(columns=read)
        if where is not None and where[0] in table.column_names:
            table = table.filter(pc.is_in(table.column(where[0]), pa.array(list(where[1]))))
        tables.append(table.select(present))
    if not tables:
        return digest("empty", key_or_prefix, wanted)
    names = sorted({tuple(t.column_names) for t in tables})
    if len(names) != 1:
        return digest("mixed-schemas", [list(n) for n in names])   # no reuse across a schema change
    return rows_digest(pa.concat_tables(tables), sort_by)


def rows_digest(table: pa.Table, sort_by: list[str]) -> str:
    """Digest of a table's rows (column names and types included), sorted by `sort_by` first so
    that row order does not matter."""
    keys = [(c, "ascending") for c in sort_by if c in table.column_names]
    if keys and table.num_rows:
        table = table.sort_by(keys)
    frame = table.to_pandas()
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy() if len(frame) else b""
    return digest(list(table.column_names), [str(t) for t in table.schema.types], table.num_rows,
                  hashlib.sha256(bytes(hashed)).hexdigest())


def values_digest(values: Iterable[Any]) -> str:
    """Digest of a set of values (sorted first)."""
    return hashlib.sha256("\n".join(sorted(str(v) for v in values)).encode()).hexdigest()


def memo_key(stage: str, suite: dict[str, Any], settings: dict[str, Any], data: str, extra: Any = None) -> str:
    """What must match for a stage's earlier validation to be reused (with the installed Great
    Expectations release: an upgrade may judge the same rows differently)."""
    return digest({"memo_version": MEMO_VERSION, "stage": stage, "suite": suite, "settings": settings,
                   "data": data, "extra": extra, "great_expectations": _gx_release()})


def _gx_release() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("great_expectations")
    except PackageNotFoundError:
        return "unknown"
