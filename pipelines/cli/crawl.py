"""`catalog-index crawl`: the command line of the crawl stage."""
from __future__ import annotations

import argparse

from rich.table import Table

from pipelines.cli.common import EPILOG, add_common_flags, settings_from_args, spark_factory
from pipelines.progress import console


def add_crawl_commands(sub) -> None:
    p = sub.add_parser(
        "crawl", help="download the manifest's images into the warehouse images/ table",
        description="Crawl every image URL of a manifest on Spark, incrementally: unchanged images are "
                    "revalidated with conditional requests, not downloaded again. Every manifest row ends "
                    "fetched, not_modified, stale (kept from the last run after a transient failure) or "
                    "quarantined with a reason code.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, metavar="URI",
                   help="catalog manifest: .csv/.parquet/.jsonl (optionally .gz), a local path, http(s):// or s3://; "
                        "columns product_id, category, image_url (+ title)")
    p.add_argument("--run-id", metavar="ID",
                   help="run id; ids must sort in time order (default: UTC now, e.g. 20261123T031500Z). "
                        "Rerunning an id replaces that run's outputs and resumes its unfinished tasks")
    p.add_argument("--categories", nargs="+", metavar="C",
                   help="crawl only these categories; the others keep the previous run's images (backfill)")
    p.add_argument("--allow-private-hosts", action="store_true", default=None,
                   help="allow URLs on loopback/private/link-local addresses and file:// (off by default: SSRF guard)")
    p.add_argument("--rewrite-history", action="store_true",
                   help="allow a --run-id that sorts before the newest committed crawl (refused by default: later "
                        "runs read earlier ones as their history); image bytes later runs reference are kept")
    p.add_argument("--no-resume", action="store_true",
                   help="discard finished tasks of an earlier attempt at this run id and crawl everything again")
    g = p.add_argument_group("crawl limits (also settable in the config file under crawl:)")
    g.add_argument("--concurrency", type=int, metavar="N", help="concurrent fetches per Spark task (default 16)")
    g.add_argument("--per-host-concurrency", type=int, metavar="N",
                   help="concurrent fetches to one host per Spark task (default 8)")
    g.add_argument("--rows-per-task", type=int, metavar="N", help="manifest rows per Spark task (default 1000)")
    g.add_argument("--retries", type=int, metavar="N", help="retries on 5xx/429/timeouts/resets (default 3)")
    g.add_argument("--timeout", type=float, metavar="S", help="whole-response deadline in seconds (default 60)")
    g.add_argument("--max-bytes", type=int, metavar="N", help="largest accepted body in bytes (default 25 MB)")
    g.add_argument("--max-pixels", type=int, metavar="N",
                   help="largest accepted width*height; above is a decompression_bomb (default 50M)")
    g.add_argument("--user-agent", metavar="UA", help="User-Agent header sent with every request")
    add_common_flags(p)
    p.set_defaults(func=cmd_crawl)


def cmd_crawl(args) -> int:
    from pipelines.crawl.stage import run_crawl
    from pipelines.layout import new_run_id

    crawl = {"allow_private_hosts": args.allow_private_hosts, "concurrency": args.concurrency,
             "per_host_concurrency": args.per_host_concurrency, "rows_per_task": args.rows_per_task,
             "retries": args.retries, "total_timeout_s": args.timeout, "max_bytes": args.max_bytes,
             "max_pixels": args.max_pixels, "user_agent": args.user_agent}
    settings = settings_from_args(args, crawl=crawl)
    run_id = args.run_id or new_run_id()
    console.print(f"crawl run [bold]{run_id}[/]: {args.manifest} -> {settings.warehouse}")
    spark = spark_factory(args, settings, f"catalog-index crawl {run_id}")
    summary = run_crawl(settings, args.manifest, run_id, categories=args.categories, runner=args.runner,
                        spark=spark, resume=not args.no_resume, rewrite_history=args.rewrite_history)
    print_crawl_summary(summary)
    return 0


def print_crawl_summary(summary) -> None:
    table = Table(title=f"crawl {summary.run_id}", show_header=True)
    table.add_column("outcome")
    table.add_column("rows", justify="right")
    table.add_row("manifest rows", f"{summary.manifest_rows:,}")
    table.add_row("fetched (new or changed)", f"{summary.fetched:,}")
    table.add_row("not modified (revalidated)", f"{summary.not_modified:,}")
    table.add_row("stale (kept last good copy)", f"{summary.stale:,}")
    for reason, count in summary.stale_reasons.items():
        table.add_row(f"  after {reason}", f"{count:,}")
    table.add_row("quarantined", f"{summary.quarantined:,}")
    for reason, count in summary.quarantine_reasons.items():
        table.add_row(f"  {reason}", f"{count:,}")
    if summary.out_of_scope:
        table.add_row("outside --categories", f"{summary.out_of_scope:,}")
    table.add_row("[bold]accounted for", f"[bold]{summary.accounted:,}")
    console.print(table)
    checked = summary.fetched + summary.not_modified + summary.stale + summary.quarantined
    rate = checked / summary.fetch_s if summary.fetch_s else 0.0
    console.print(f"{summary.bytes_downloaded / 1e6:,.1f} MB downloaded; {checked:,} URLs checked in "
                  f"{summary.fetch_s:.1f}s ({rate:,.0f}/s), {summary.elapsed_s:.1f}s in all; "
                  f"{summary.removed:,} images removed from the catalog since "
                  f"{summary.previous_run_id or 'the first run'}"
                  + (f"; resumed {summary.tasks_resumed} of {summary.tasks} tasks" if summary.tasks_resumed else ""))
