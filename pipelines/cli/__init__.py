"""`catalog-index`: the command line for every stage and for the sample catalog.

Each subcommand parses flags into Settings overrides and calls one library function;
no stage logic lives here. Exit codes: 0 success, 1 the run finished but stopped
(a gate or a stage refused), 2 usage or configuration error.
"""
from __future__ import annotations

import argparse
import sys

from pipelines.cli import crawl, dedup, embed, head, index, run, sample, serve, validate
from pipelines.cli.common import EPILOG
from pipelines.errors import CatalogIndexError
from pipelines.progress import console


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catalog-index",
        description="Nightly catalog image search pipeline: crawl -> dedup -> validate -> embed -> "
                    "build-index -> publish, on Spark, into a warehouse (local directory or S3).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    crawl.add_crawl_commands(sub)
    validate.add_validate_commands(sub)
    dedup.add_dedup_commands(sub)
    embed.add_embed_commands(sub)
    run.add_run_commands(sub)
    sample.add_sample_commands(sub)
    index.add_index_commands(sub)
    head.add_head_commands(sub)
    serve.add_serve_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CatalogIndexError as exc:
        # Exit codes live on the error classes (pipelines.errors): 2 = fix the command or the
        # configuration, 1 = the command ran and a stage refused to go on.
        console.print(f"[red]{'error' if exc.exit_code == 2 else 'stopped'}:[/] {exc}")
        return exc.exit_code
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: rerun the same command with the same --run-id to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
