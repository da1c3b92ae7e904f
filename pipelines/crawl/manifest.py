"""Read a catalog manifest (CSV, Parquet or JSON Lines; local, HTTP or S3) into the MANIFEST schema.

A manifest with a missing or misnamed column fails at once, naming what it found.
Row-level problems (empty fields, repeated (product_id, image_url) pairs) are not
errors: `split_manifest_rows` sends them to quarantine with a reason code.
"""
from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipelines.config import S3Settings
from pipelines.storage import StorageError, read_uri_bytes
from schemas.tables import MANIFEST
from pipelines.errors import UsageError

REQUIRED_COLUMNS = ("product_id", "category", "image_url")
OPTIONAL_COLUMNS = ("title",)


class ManifestError(UsageError):
    """The manifest cannot be used at all; the message says what was found and what is expected."""


def _format_of(uri: str) -> str:
    name = PurePosixPath(urlsplit(uri).path).name.lower()
    for suffix in (".gz", ".zst", ".bz2"):
        name = name.removesuffix(suffix)
    if name.endswith(".csv") or name.endswith(".tsv"):
        return "csv"
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise ManifestError(f"cannot tell the format of manifest {uri!r}: name it .csv, .parquet or .jsonl")


def read_manifest(uri: str, s3: S3Settings | None = None) -> pa.Table:
    """Read the manifest at `uri` and return it in the MANIFEST schema, rows in input order."""
    fmt = _format_of(uri)
    try:
        raw = read_uri_bytes(uri, s3)
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest: {exc}") from exc
    name = PurePosixPath(urlsplit(uri).path).name
    compression = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}.get(PurePosixPath(name).suffix)
    try:
        if compression:
            raw = pa.input_stream(pa.BufferReader(raw), compression=compression).read()
        stream = pa.BufferReader(raw)
        if fmt == "csv":
            delimiter = "\t" if ".tsv" in name.lower() else ","
            # Every column as text: ids like 00123 must keep their zeros.
            table = pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                   convert_options=pacsv.ConvertOptions(column_types=_all_strings(raw, delimiter)))
        elif fmt == "parquet":
            table = pq.read_table(stream)
        else:
            table = pajson.read_json(stream)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {name} is not valid {fmt.upper()}: {exc}") from exc
    return normalize_manifest(table, name)


def _all_strings(raw: bytes, delimiter: str) -> dict[str, pa.DataType]:
    header = raw[: raw.find(b"\n") if b"\n" in raw else len(raw)].decode("utf-8-sig", "replace").strip()
    return {col.strip().strip('"'): pa.string() for col in header.split(delimiter)}


def normalize_manifest(table: pa.Table, name: str = "manifest") -> pa.Table:
    columns = [c.strip().lstrip("\ufeff") for c in table.column_names]
    table = table.rename_columns(columns)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(f"column{'s' if len(missing) > 1 else ''} {', '.join(repr(c) for c in missing)} "
                            f"missing in {name} (found: {', '.join(columns) or 'no columns'}); "
                            f"a manifest needs {', '.join(REQUIRED_COLUMNS)} and may have {', '.join(OPTIONAL_COLUMNS)}")
    arrays = {"row_index": pa.array(range(table.num_rows), pa.int64())}
    for col in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
        if col not in columns:
            arrays[col] = pa.nulls(table.num_rows, pa.string())
            continue
        values = table[col]
        if not pa.types.is_string(values.type) and not pa.types.is_large_string(values.type):
            try:
                values = values.cast(pa.string())
            except pa.ArrowNotImplementedError as exc:
                raise ManifestError(f"column {col!r} in {name} has type {values.type}, "
                                    "which cannot be read as text") from exc
        arrays[col] = values.cast(pa.string())
    return pa.table(arrays, schema=MANIFEST)


def split_manifest_rows(manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split manifest rows into (rows to crawl, rows to quarantine with `reason`/`detail`).

    Keeps the first occurrence of each (product_id, image_url); later ones are duplicate_row.
    Surrounding whitespace is stripped; an empty required field is missing_field.
    """
    rows = manifest.copy()
    for col in REQUIRED_COLUMNS:
        rows[col] = rows[col].astype("string").str.strip()
    empty = rows[list(REQUIRED_COLUMNS)].isna() | rows[list(REQUIRED_COLUMNS)].eq("")
    missing = empty.any(axis=1)
    duplicate = ~missing & rows.duplicated(["product_id", "image_url"], keep="first")
    rejected = rows[missing | duplicate].copy()
    rejected["reason"] = "duplicate_row"
    rejected.loc[missing[missing | duplicate], "reason"] = "missing_field"
    rejected["detail"] = [
        "empty " + ", ".join(c for c in REQUIRED_COLUMNS if empty.at[i, c]) if missing[i]
        else "same product_id and image_url as an earlier row" for i in rejected.index]
    return rows[~(missing | duplicate)].astype({c: object for c in REQUIRED_COLUMNS}), rejected
