"""Spark entry point of the validate stage.

    spark-submit [--master URL] [--properties-file infra/spark/cluster.conf] jobs/validate.py \
        --warehouse s3://bucket/warehouse --run-id 20261123T0300Z --stage manifest images [--force]

Same flags as `catalog-index validate --help`, except that --stage takes one or more stages: they are
validated in the order given, in one Spark application, and the first one that stops (a tripped gate,
exit 1) ends the job. The DAGs' validate task checks manifest + images, validate_index embeddings + index.
"""
import argparse
import sys

from pipelines.cli import main

COMMAND = "validate"  # this job runs `catalog-index validate`, once per --stage


def stage_commands(argv: list[str]) -> list[list[str]]:
    """`--stage manifest images` -> one `catalog-index validate` command line per stage, in order."""
    stages = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    stages.add_argument("--stage", nargs="+", action="extend", default=[])
    known, rest = stages.parse_known_args(argv)
    if not known.stage:
        return [[COMMAND, *rest]]  # let the validate parser say what is missing
    return [[COMMAND, *rest, "--stage", stage] for stage in known.stage]


def run(argv: list[str]) -> int:
    for command in stage_commands(argv):
        code = main(command)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
