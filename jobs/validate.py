"""Spark entry point of the validate stage.

    spark-submit [--master URL] [--properties-file infra/spark/cluster.conf] jobs/validate.py \
        --warehouse s3://bucket/warehouse --run-id 20261123T0300Z --stage images

Same flags as `catalog-index validate --help`.
"""
import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", *sys.argv[1:]]))
