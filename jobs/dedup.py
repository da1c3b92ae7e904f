"""Spark entry point of the dedup stage.

    spark-submit [--master URL] [--properties-file infra/spark/cluster.conf] jobs/dedup.py \
        --warehouse s3://bucket/warehouse --run-id 20261123T0300Z

Same flags as `catalog-index dedup --help`.
"""
import sys

from pipelines.cli import main

COMMAND = "dedup"  # this job runs `catalog-index dedup`

if __name__ == "__main__":
    sys.exit(main([COMMAND, *sys.argv[1:]]))
