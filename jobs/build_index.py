"""Spark entry point of the index build stage.

    spark-submit [--master URL] [--properties-file infra/spark/cluster.conf] jobs/build_index.py \
        --warehouse s3://bucket/warehouse --run-id 20261123T0300Z [--categories shoes bags]

Same flags as `catalog-index build-index --help`: one Spark task per shard; the snapshot is not
visible to readers until `jobs/publish.py` runs. Exit code 1: a shard failed its recall check.
"""
import sys

from pipelines.cli import main

COMMAND = "build-index"  # this job runs `catalog-index build-index`

if __name__ == "__main__":
    sys.exit(main([COMMAND, *sys.argv[1:]]))
