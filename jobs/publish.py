"""Entry point of the publish stage (no Spark work: it verifies files and moves LATEST).

    spark-submit jobs/publish.py --warehouse s3://bucket/warehouse --run-id 20261123T0300Z
    python jobs/publish.py --warehouse s3://bucket/warehouse            # the newest passed build

Same flags as `catalog-index publish --help`. Kept as a job so the DAG runs every stage the same way.
"""
import sys

from pipelines.cli import main

if __name__ == "__main__":
    sys.exit(main(["publish", *sys.argv[1:]]))
