"""Read a catalog manifest (CSV, Parquet or JSON Lines; local, HTTP or S3) into the MANIFEST schema.

A manifest with a missing or misnamed column fails at once, naming what it found.
Row-level problems (empty fields, repeated (product_id, image_url) pairs, URLs over
crawl.max_url_length) are not errors: `split_manifest_rows` sends them to quarantine with
a reason code.

A manifest is read through `read_uri_bytes` like any outside input: an http(s):// feed
under the crawl's address policy and deadline, every source capped at
crawl.max_manifest_bytes, and its decompressed size capped the same (a gzip bomb stops
with a ManifestError, not with the driver out of memory).
"""
from __future__ import annotations

from pathlib import PurePosixPath
from urllib.parse import urlsplit

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipelines.config import CrawlSettings, S3Settings
from pipelines.address_policy import AddressPolicy
from pipelines.storage import StorageError, read_uri_bytes
from schemas.reasons import BAD_URL, DUPLICATE_ROW, MISSING_FIELD
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


def read_manifest(uri: str, s3: S3Settings | None = None, crawl: CrawlSettings | None = None) -> pa.Table:
    """Read the manifest at `uri` and return it in the MANIFEST schema, rows in input order.

    `crawl` gives the address policy for http(s):// manifests and the size cap and deadline
    (defaults: CrawlSettings(), so public addresses only)."""
    crawl = crawl or CrawlSettings()
    fmt = _format_of(uri)
    cap = crawl.max_manifest_bytes
    try:
        raw = read_uri_bytes(uri, s3, crawl.manifest_timeout_s, max_bytes=cap,
                             policy=AddressPolicy(crawl.allow_private_hosts, list(crawl.allow_networks)))
    except StorageError as exc:
        raise ManifestError(f"cannot read manifest: {exc}") from exc
    name = PurePosixPath(urlsplit(uri).path).name
    compression = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd"}.get(PurePosixPath(name).suffix)
    try:
        if compression:
            raw = pa.input_stream(pa.BufferReader(raw), compression=compression).read(cap + 1)
            if len(raw) > cap:
                raise ManifestError(f"manifest {name} decompresses to more than crawl.max_manifest_bytes={cap:,} "
                                    "bytes; raise the setting if the catalog really is that large")
        stream = pa.BufferReader(raw)
        if fmt == "csv":
            delimiter = "\t" if ".tsv" in name.lower() else ","
            table = _read_csv(raw, delimiter)
        elif fmt == "parquet":
            table = pq.read_table(stream)
        else:
            table = pajson.read_json(stream)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {name} is not valid {fmt.upper()}: {exc}") from exc
    return normalize_manifest(table, name)


def _read_csv(raw: bytes, delimiter: str) -> pa.Table:
    # Every column as text: ids like 00123 must keep their zeros.
    options = dict(parse_options=pacsv.ParseOptions(delimiter=delimiter),
                   convert_options=pacsv.ConvertOptions(column_types=_all_strings(raw, delimiter)))
    try:
        return pacsv.read_csv(pa.BufferReader(raw), **options)
    except pa.ArrowInvalid as exc:
        if "straddl" not in str(exc):
            raise
    # A row longer than Arrow's 1 MB parse block (a hostile 10 MB URL): parse as one block, so
    # that the row reaches split_manifest_rows (bad_url) instead of failing the whole manifest.
    return pacsv.read_csv(pa.BufferReader(raw), read_options=pacsv.ReadOptions(block_size=len(raw) + 1), **options)


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


def split_manifest_rows(manifest: pd.DataFrame, max_url_length: int | None = None
                        ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split manifest rows into (rows to crawl, rows to quarantine with `reason`/`detail`).

    Keeps the first occurrence of each (product_id, image_url); later ones are duplicate_row.
    Surrounding whitespace is stripped; an empty required field is missing_field; an
    image_url longer than `max_url_length` is bad_url (it is never sent to a task).
    """
    rows = manifest.copy()
    for col in REQUIRED_COLUMNS:
        rows[col] = rows[col].astype("string").str.strip()
    empty = rows[list(REQUIRED_COLUMNS)].isna() | rows[list(REQUIRED_COLUMNS)].eq("")
    missing = empty.any(axis=1)
    lengths = rows["image_url"].str.len().fillna(0)
    too_long = ~missing & (lengths > max_url_length) if max_url_length else pd.Series(False, index=rows.index)
    duplicate = ~missing & ~too_long & rows.duplicated(["product_id", "image_url"], keep="first")
    bad = missing | too_long | duplicate
    rejected = rows[bad].copy()
    rejected["reason"] = [MISSING_FIELD if missing[i] else BAD_URL if too_long[i] else DUPLICATE_ROW
                          for i in rejected.index]
    rejected["detail"] = [
        "empty " + ", ".join(c for c in REQUIRED_COLUMNS if empty.at[i, c]) if missing[i]
        else f"image_url is {int(lengths[i]):,} characters, over crawl.max_url_length={max_url_length:,}"
        if too_long[i] else "same product_id and image_url as an earlier row" for i in rejected.index]
    return rows[~bad].astype({c: object for c in REQUIRED_COLUMNS}), rejected
