"""Spark entry point of the crawl stage.

    spark-submit [--master URL] [--properties-file infra/spark/cluster.conf] jobs/crawl.py \
        --manifest s3://bucket/catalog.csv --warehouse s3://bucket/warehouse --run-id 20261123T0300Z

Same flags as `catalog-index crawl --help`. Under spark-submit the session comes from
spark-submit's settings; run directly it starts a local[*] session.
"""
import sys

from pipelines.cli import main

COMMAND = "crawl"  # this job runs `catalog-index crawl`

if __name__ == "__main__":
    sys.exit(main([COMMAND, *sys.argv[1:]]))
