"""Spark entry point of the embed stage.

    spark-submit [--master URL] [--properties-file infra/spark/cluster.conf] jobs/embed.py \
        --warehouse s3://bucket/warehouse --run-id 20261123T0300Z

Same flags as `catalog-index embed --help`.
"""
import sys

from pipelines.cli import main

COMMAND = "embed"  # this job runs `catalog-index embed`

if __name__ == "__main__":
    sys.exit(main([COMMAND, *sys.argv[1:]]))
