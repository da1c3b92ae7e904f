"""Entry point of the train-head step (no Spark: the head trains in one process).

    python jobs/train_head.py --warehouse s3://bucket/warehouse --run-id 20261123T0300Z [--epochs 30]

Same flags as `catalog-index train-head --help`.
"""
import sys

from pipelines.cli import main

COMMAND = "train-head"  # this job runs `catalog-index train-head`

if __name__ == "__main__":
    sys.exit(main([COMMAND, *sys.argv[1:]]))
