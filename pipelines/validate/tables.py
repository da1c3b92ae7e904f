"""Reading what a validation checks: warehouse tables as Spark DataFrames, and the Parquet
footers and single columns validation reads with pyarrow instead of a Spark query.

Holds `read_spark_table`, the footer-schema shortcut, rows per value of one column, the
committed-crawl check, `ROW_KEYS` (the row key of each validated table) and the quarantined
keys downstream stages anti-join on (`quarantined_keys`, `exclude_quarantined`).

Reading: tables are read by Spark from the warehouse (`read_spark_table`): `spark.read.parquet`
on local paths for file:// warehouses, `s3a://` paths for s3:// ones (the cluster needs
hadoop-aws and `spark.hadoop.fs.s3a.*` settings), or, with `validation.arrow_fallback_for_s3`,
tables read with boto3 and handed to Spark as Arrow (tests, small warehouses).

This module only reads: it never writes to the warehouse and never imports Great Expectations.
"""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipelines import layout
from pipelines.errors import UsageError
from pipelines.fingerprint import parquet_keys
from pipelines.storage import LocalStorage, S3Storage, Storage
from schemas.tables import QUARANTINE


class ValidationInputError(UsageError):
    """What a stage validates is missing or unreadable; the message says what to run first."""


# Row keys downstream stages anti-join on (also in each suite's meta.row_key).
ROW_KEYS = {"manifest": ["row_index"], "images": ["product_id", "image_url"], "embeddings": ["sha256"],
            "index": ["shard"]}


def read_spark_table(spark, storage: Storage, key_or_prefix: str, schema: pa.Schema | None = None, *,
                     allow_arrow_fallback: bool = False):
    """A Spark DataFrame over one Parquet file or every `.parquet` under a prefix.

    Local warehouses: Spark reads the files itself. S3: `s3a://` paths (the session needs
    hadoop-aws and fs.s3a settings), or, when `allow_arrow_fallback`, the table is read
    with boto3 on the driver and handed to Spark as Arrow (only for small tables).
    `schema` is used only when there are no files (an empty table of that schema).
    """
    keys = _parquet_keys(storage, key_or_prefix)
    if not keys:
        if schema is None:
            raise ValidationInputError(f"no Parquet files at {storage.uri_for(key_or_prefix)}")
        return spark.createDataFrame(schema.empty_table())
    # The schema is read from the files, not imposed: a missing column must show as missing
    # (the suites check for it), not as a column of nulls.
    if isinstance(storage, LocalStorage):
        paths = [str(storage.root / k) for k in sorted(keys)]
        footer_schema = _spark_schema_from_footer(paths[0])
        reader = spark.read if footer_schema is None else spark.read.schema(footer_schema)
        return reader.parquet(*paths)
    if isinstance(storage, S3Storage):
        if allow_arrow_fallback:
            return spark.createDataFrame(storage.read_table(key_or_prefix))
        base = f"s3a://{storage.bucket}/" + (f"{storage.prefix}/" if storage.prefix else "")
        return spark.read.parquet(*[base + k for k in sorted(keys)])
    raise ValidationInputError(f"cannot read {storage.uri_for(key_or_prefix)} with Spark: unknown storage type")


_parquet_keys = parquet_keys  # the Parquet files of a table: one `.parquet` key or those under a prefix, sorted


def _rows_per_value(storage: Storage, key_or_prefix: str, column: str,
                    where: tuple[str, tuple[str, ...]] | None = None) -> dict[Any, int]:
    """Rows per value of `column` in a Parquet table, counted with pyarrow from that column's
    chunks alone (dictionary-encoded: a few bytes a row, whatever the table's width), instead
    of a Spark group-by query (0.2-0.4 s, most of it fixed cost). `where` = (column, values):
    count only rows whose `column` is one of `values`. Validation checks the total against
    GX's row count of the Spark frame (`_cross_check`)."""
    import pyarrow.parquet as pq

    columns = [column] + ([where[0]] if where else [])
    counts: dict[Any, int] = {}
    for key in _parquet_keys(storage, key_or_prefix):
        with storage.open_input(key) as source:
            table = pq.ParquetFile(source, read_dictionary=columns).read(columns=columns)
        if table.num_rows == 0:
            continue
        grouped = table.unify_dictionaries().group_by(columns).aggregate([([], "count_all")])
        for row in grouped.to_pylist():
            if where is None or row[where[0]] in where[1]:
                counts[row[column]] = counts.get(row[column], 0) + row["count_all"]
    return counts


def _spark_schema_from_footer(path: str):
    """The schema Spark would infer for a local Parquet file, from its footer (pyarrow), or None.

    Without `mergeSchema`, Spark infers a Parquet table's schema from one file's footer, and
    runs a Spark job to read it (~0.1-0.3 s of JVM time, per table, per validation). Reading
    the footer here skips that job. Only for types that convert one to one (strings, numbers,
    booleans, binary, dates, UTC timestamps, lists and structs of those); anything else, e.g.
    a timestamp without time zone, is left to Spark's own inference.
    """
    import pyarrow.parquet as pq
    import pyarrow.types as pat
    from pyspark.sql.pandas.types import from_arrow_schema

    def plain(t) -> bool:
        if pat.is_list(t) or pat.is_large_list(t):
            return plain(t.value_type)
        if pat.is_struct(t):
            return all(plain(f.type) for f in t)
        if pat.is_timestamp(t):
            return t.tz is not None and t.tz.upper() in ("UTC", "+00:00", "Z", "ETC/UTC")
        return (pat.is_string(t) or pat.is_large_string(t) or pat.is_boolean(t) or pat.is_binary(t)
                or pat.is_large_binary(t) or pat.is_date32(t) or pat.is_floating(t)
                or (pat.is_integer(t) and pat.is_signed_integer(t)))

    try:
        schema = pq.read_schema(path)
        if not all(plain(f.type) for f in schema):
            return None
        return from_arrow_schema(schema)
    except Exception:  # an unreadable footer: let Spark say what is wrong with the file
        return None


def _parquet_column_names(storage: Storage, key_or_prefix: str) -> list[str]:
    """Column names of a Parquet table (its first file's footer); [] when it has no files."""
    import pyarrow.parquet as pq

    keys = _parquet_keys(storage, key_or_prefix)
    if not keys:
        return []
    with storage.open_input(keys[0]) as source:
        return pq.ParquetFile(source).schema_arrow.names


def _read_json(storage: Storage, key: str, max_bytes: int | None = None) -> dict[str, Any] | None:
    return json.loads(storage.read_text(key, max_bytes)) if storage.exists(key) else None


def _require_committed_crawl(storage: Storage, run_id: str) -> dict[str, Any]:
    summary = _read_json(storage, layout.crawl_success_key(run_id))
    if summary is None:
        raise ValidationInputError(f"crawl run {run_id} is not committed in {storage.uri} "
                                   f"(no {layout.crawl_success_key(run_id)}): run `catalog-index crawl --run-id {run_id}` first")
    return summary


def quarantined_keys(storage: Storage, run_id: str, stage: str) -> pa.Table:
    """The row keys a validated stage rejected (empty when it rejected none or did not run)."""
    keys = ROW_KEYS[stage]
    key = layout.validation_quarantine_key(run_id, stage)
    if not storage.exists(key):
        return pa.schema([QUARANTINE.field(k) if k in QUARANTINE.names else pa.field(k, pa.string())
                          for k in keys]).empty_table()
    return storage.read_table(key, columns=keys)


def exclude_quarantined(df, storage: Storage, run_id: str, stage: str, spark):
    """`df` without the rows validation quarantined for `stage` (anti-join on the stage's row key)."""
    keys = quarantined_keys(storage, run_id, stage)
    if keys.num_rows == 0:
        return df
    return df.join(spark.createDataFrame(keys), on=ROW_KEYS[stage], how="left_anti")
