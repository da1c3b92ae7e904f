"""`catalog-index run` and `backfill`: the whole pipeline without Airflow."""
from __future__ import annotations

import argparse

from pipelines.cli.common import (
    EPILOG,
    add_common_flags,
    settings_from_args,
    spark_factory,
)
from pipelines.layout import new_run_id, reports_prefix
from pipelines.progress import console


def add_run_commands(sub) -> None:
    for name, text in (("run", "run the whole nightly pipeline without Airflow: crawl -> dedup -> validate -> "
                               "embed -> build-index -> validate -> publish"),
                       ("backfill", "rerun the pipeline for some categories only; other categories keep their "
                                    "images, embeddings and index shards byte for byte")):
        p = sub.add_parser(name, help=text, description=text.capitalize() + ". The same stages, in the same order, "
                           "as the Airflow DAGs. Exits 1 when a stage or a validation gate stops the run (nothing "
                           "is published then), and writes the run report either way.",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--manifest", required=True, metavar="URI", help="catalog manifest (see `crawl --help`)")
        p.add_argument("--run-id", metavar="ID", help="run id (default: UTC now); rerun an id to resume it")
        p.add_argument("--categories", nargs="+", metavar="C", required=(name == "backfill"),
                       help="only these categories" + (" (required)" if name == "backfill" else ""))
        p.add_argument("--allow-private-hosts", action="store_true", default=None,
                       help="allow image URLs on loopback/private addresses (the sample catalog needs it)")
        p.add_argument("--force", action="store_true",
                       help="publish even when a validation gate trips (recorded in the run report)")
        p.add_argument("--rewrite-history", action="store_true",
                       help="allow a --run-id that sorts before the newest committed run (refused by default: later "
                            "runs read earlier ones as their history); image bytes later runs reference are kept")
        p.add_argument("--stages", nargs="+", metavar="S", choices=None,
                       help="run only these stages, in pipeline order (default: all)")
        add_common_flags(p)
        p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.pipeline import STAGES, PipelineStopped, RunContext, run_pipeline

    settings = settings_from_args(args, crawl={"allow_private_hosts": args.allow_private_hosts})
    run_id = args.run_id or new_run_id()
    stages = [s for s in STAGES if not args.stages or s in {x.replace("-", "_") for x in args.stages}]
    ctx = RunContext(settings, run_id, manifest=args.manifest, categories=args.categories, force=args.force,
                     rewrite_history=args.rewrite_history,
                     runner=args.runner, spark=spark_factory(args, settings, f"catalog-index {args.command} {run_id}",
                                                         validation=True))
    console.print(f"{args.command} [bold]{run_id}[/]: {args.manifest} -> {settings.warehouse}"
                  + (f" (categories: {', '.join(args.categories)})" if args.categories else ""))

    def progress(stage: str, seconds: float, result) -> None:
        console.print(f"[green]✓[/] {stage:<15} {seconds:7.1f}s  {_stage_line(stage, result)}")

    report_uri = f"{settings.warehouse.rstrip('/')}/{reports_prefix(run_id)}report.html"
    try:
        report = run_pipeline(ctx, stages, on_stage=progress)
    except PipelineStopped as exc:
        console.print(f"[red]✗ {exc.stage}: stopped[/]\n{exc.reason}\nreport: {report_uri}")
        return 1
    snapshot = report.get("snapshot") or {}
    if snapshot:
        console.print(f"published snapshot [bold]{snapshot['snapshot_id']}[/] of index {snapshot['index']}: "
                      f"{snapshot['vectors']:,} vectors for {snapshot['products']:,} products in "
                      f"{snapshot['shards']} shards, recall@10 >= {snapshot['recall_at_10']:.3f}")
    console.print(f"report: {report_uri}")
    for sample in report.get("search_samples", [])[:1]:
        console.print(f"example search, query {sample['query']}:")
        for hit in sample["results"]:
            console.print(f"  {hit['score']:.3f}  {hit['product_id']}  ({hit['category']})")
    return 0


def _stage_line(stage: str, result) -> str:
    if stage == "crawl":
        return (f"{result.manifest_rows:,} rows: {result.fetched:,} fetched, {result.not_modified:,} not modified, "
                f"{result.stale:,} stale, {result.quarantined:,} quarantined")
    if stage == "dedup":
        return (f"{result.unique_images:,} images -> {result.clusters:,} clusters "
                f"({result.exact_duplicate_rows:,} exact, {result.near_duplicate_rows:,} near duplicate rows)")
    if stage == "embed":
        return (f"{result.embedded:,} embedded ({result.images_per_s:,.1f}/s on {result.device}), "
                f"{result.reused:,} from cache, {result.quarantined:,} quarantined")
    if stage == "build_index":
        return f"{result.vectors:,} vectors in {len(result.shards)} shards ({result.reused_shards} reused)"
    if stage == "publish":
        return f"snapshot {result.snapshot_id} (previous {result.previous_snapshot or 'none'})"
    if isinstance(result, dict):
        return "; ".join(f"{name}: {getattr(v, 'outcome', 'passed')}"
                         + (f" (inputs unchanged: run {v.extra['reused_validation_of']}'s result)"
                            if (getattr(v, "extra", None) or {}).get("reused_validation_of") else "")
                         for name, v in result.items())
    return ""
