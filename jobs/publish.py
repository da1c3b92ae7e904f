"""Entry point of the publish stage (no Spark work: it verifies files and moves LATEST).

    spark-submit jobs/publish.py --warehouse s3://bucket/warehouse --run-id 20261123T0300Z
    python jobs/publish.py --warehouse s3://bucket/warehouse            # the newest passed build

Same flags as `catalog-index publish --help`. Kept as a job so the DAG runs every stage the same way;
like the DAG's in-process publish task, publishing a run (--run-id) also writes its run report,
reports/<run_id>/report.{html,json}.
"""
import sys

from pipelines.cli import build_parser, main

COMMAND = "publish"  # this job runs `catalog-index publish`, then writes the run report


def write_run_report(argv: list[str]) -> None:
    """The run report of the run just published, with the snapshot LATEST now points to."""
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.cli.index import _index_settings, _storage
    from pipelines.pipeline import finish_run
    from pipelines.snapshot import read_latest, read_manifest

    args = build_parser().parse_args([COMMAND, *argv])
    if not args.run_id:
        return
    settings, cfg = _index_settings(args)
    storage = _storage(settings)
    manifest = read_manifest(storage, cfg.name, read_latest(storage, cfg.name)["snapshot_id"])
    finish_run(settings, args.run_id, published_manifest=manifest)


def run(argv: list[str]) -> int:
    code = main([COMMAND, *argv])
    if code == 0:
        write_run_report(argv)
    return code


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
