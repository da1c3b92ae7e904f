"""`catalog-index crawl`: the command line of the crawl stage."""
from __future__ import annotations

import argparse

from rich.table import Table

from pipelines.cli.common import (
    EPILOG,
    add_common_flags,
    settings_from_args,
    spark_factory,
)
from pipelines.layout import new_run_id
from pipelines.progress import console


def add_crawl_commands(sub) -> None:
    p = sub.add_parser(
        "crawl", help="download the manifest's images into the warehouse images/ table",
        description="Crawl every image URL of a manifest on Spark, incrementally: unchanged images are "
                    "revalidated with conditional requests, not downloaded again. Every manifest row ends "
                    "fetched, not_modified, stale (last run's copy kept: the fetch failed in a way that says nothing "
                    "about the image, e.g. a timeout, HTTP 503, a failed TLS handshake, a body cut short) or "
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
                   help="allow URLs on loopback/private/link-local addresses and file:// (off by default: SSRF "
                        "guard, checked on the address each connection reaches; cloud metadata addresses stay refused)")
    p.add_argument("--allow-s3-buckets", nargs="+", metavar="BUCKET",
                   help="buckets whose s3:// image URLs may be read with the pipeline's (or crawl.s3_profile's) "
                        "credentials; other s3:// image URLs are quarantined as ssrf_blocked (default: none)")
    p.add_argument("--proxy", metavar="URL",
                   help="send image requests through this HTTP proxy (it must enforce egress rules itself); "
                        "HTTP(S)_PROXY, NO_PROXY and ~/.netrc are never read")
    p.add_argument("--rewrite-history", action="store_true",
                   help="allow a --run-id that sorts before the newest committed crawl (refused by default: later "
                        "runs read earlier ones as their history); image bytes later runs reference are kept")
    p.add_argument("--no-resume", action="store_true",
                   help="discard finished tasks of an earlier attempt at this run id and crawl everything again")
    g = p.add_argument_group(
        "crawl limits (also settable in the config file under crawl:)",
        "No URL costs more than (retries + 1) * timeout + retries * crawl.max_backoff_s (30 s) of waiting, "
        "plus any wait for a free per-host slot; with the defaults 60 s, as timeouts are not retried.")
    g.add_argument("--concurrency", type=int, metavar="N", help="concurrent fetches per Spark task (default 16)")
    g.add_argument("--per-host-concurrency", type=int, metavar="N",
                   help="concurrent fetches to one host:port per Spark task (default 8)")
    g.add_argument("--rows-per-task", type=int, metavar="N", help="manifest rows per Spark task (default 1000)")
    g.add_argument("--retries", type=int, metavar="N",
                   help="retries on 5xx/429/resets, with backoff honouring Retry-After (default 3)")
    g.add_argument("--timeout", type=float, metavar="S",
                   help="wall-clock deadline of one attempt at a URL: connect, TLS, headers, redirects and the whole "
                        "body, however slowly bytes arrive (default 60)")
    g.add_argument("--retry-timeouts", action="store_true", default=None,
                   help="also retry attempts that ran past a timeout (off: a trickling or silent server costs one "
                        "--timeout, not retries + 1 of them)")
    g.add_argument("--max-bytes", type=int, metavar="N",
                   help="largest accepted body in bytes, counted after Content-Encoding is decoded (default 25 MB)")
    g.add_argument("--max-pixels", type=int, metavar="N",
                   help="largest accepted width*height; above is a decompression_bomb (default 50M)")
    g.add_argument("--max-url-length", type=int, metavar="N",
                   help="longer image URLs are quarantined as bad_url (default 8192)")
    g.add_argument("--user-agent", metavar="UA", help="User-Agent header sent with every request")
    add_common_flags(p)
    p.set_defaults(func=cmd_crawl)


def cmd_crawl(args) -> int:
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.crawl.stage import run_crawl

    crawl = {"allow_private_hosts": args.allow_private_hosts, "concurrency": args.concurrency,
             "per_host_concurrency": args.per_host_concurrency, "rows_per_task": args.rows_per_task,
             "retries": args.retries, "total_timeout_s": args.timeout, "max_bytes": args.max_bytes,
             "max_pixels": args.max_pixels, "user_agent": args.user_agent, "retry_timeouts": args.retry_timeouts,
             "max_url_length": args.max_url_length, "allow_s3_buckets": args.allow_s3_buckets, "proxy": args.proxy}
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
