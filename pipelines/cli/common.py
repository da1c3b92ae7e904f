"""What every `catalog-index` command shares: the common flags, settings from flags, a Spark factory."""
from __future__ import annotations

import argparse

from pipelines.config import load_settings
from pipelines.spark import get_spark

EPILOG = """Settings come from, lowest priority first: built-in defaults, the YAML file named by
--config or CATALOG_INDEX_CONFIG, env vars (CATALOG_INDEX_WAREHOUSE, CATALOG_INDEX_CRAWL__RETRIES,
CATALOG_INDEX_S3__ENDPOINT_URL, ...), then flags. See README.md, "Configuration"."""


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common settings")
    g.add_argument("--config", metavar="FILE", help="YAML settings file (default: $CATALOG_INDEX_CONFIG)")
    g.add_argument("--warehouse", metavar="URI",
                   help="warehouse root: file:///path or s3://bucket/prefix (default: ~/.catalog-index/warehouse)")
    g.add_argument("--s3-endpoint-url", metavar="URL",
                   help="S3-compatible endpoint for s3:// URIs (MinIO, Ceph, moto); default AWS")
    g.add_argument("--spark-master", metavar="URL",
                   help="Spark master when the job starts its own session (default local[*]; "
                        "ignored under spark-submit, which sets its own)")
    g.add_argument("--runner", choices=["spark", "local"], default="spark",
                   help="where stage tasks run: on Spark (default) or sequentially in this process (debugging)")


def settings_from_args(args: argparse.Namespace, **extra):
    overrides = {"warehouse": args.warehouse, "s3": {"endpoint_url": args.s3_endpoint_url},
                 "spark": {"master": args.spark_master}}
    for key, value in extra.items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    return load_settings(args.config, **overrides)


def spark_factory(args, settings, app_name: str, *, validation: bool = False):
    """A factory, so that stages start Spark only once their input has been checked. With `--runner
    local` none, except for a command that validates (`validation`): Great Expectations runs on Spark
    whatever the runner, so `run --runner local` still starts Spark for its validate stages."""
    if args.runner == "local" and not validation:
        return None

    return lambda: get_spark(settings, app_name)
