"""`catalog-index validate`: the command line of the validate stage (pipelines.validate).

Parses flags, calls `validate_stage`, prints the expectations and gates, and turns a
tripped gate into exit code 1 with the message that says how to override. No validation
logic lives here. `pipelines.cli.build_parser` registers it with `add_validate_commands(sub)`.
"""
from __future__ import annotations

import argparse

from pipelines.cli.common import (
    EPILOG,
    add_common_flags,
    settings_from_args,
    spark_factory,
)
from pipelines.progress import console

DESCRIPTION = """Validate one stage of a run with its Great Expectations suite (schemas/gx/<stage>.json) on Spark,
then apply the batch-level gates that decide whether the run may be published.

Rows failing a row-level expectation go to quarantine/<RUN_ID>/validate/<STAGE>.parquet (reason = the
expectation's name) and the run goes on without them. A tripped gate exits with code 1 and says which
gate, with the numbers, and how to override. Every result is written to
reports/<RUN_ID>/validation/<STAGE>.json and the GX Data Docs site to reports/<RUN_ID>/gx/<STAGE>/.

stages:
  manifest    required fields, (product_id, image_url) unique, URL form; new categories are flagged
  images      live crawled images: dimensions, aspect ratio, format, byte size; gates on the crawl
              failure rate, the decode failure rate and categories that lost images since the
              previous successful run
  embeddings  one vector per canonical image, dimension, all finite, L2 norm ~ 1
  index       vector count = canonical images, measured recall@10 per shard

exit codes: 0 passed (or forced), 1 a gate tripped, 2 usage, configuration or missing input."""

THRESHOLDS = """thresholds (config file `validation:` section, or CATALOG_INDEX_VALIDATION__<FIELD>):
  max_crawl_failure_rate (0.10)  max_decode_failure_rate (0.02)  max_category_drop (0.5)
  category_drop_min_previous (20)  max_quarantine_rate ({"manifest": 0.05, "images": 0.05, "embeddings": 0.0})
  min_width/min_height (32)  min/max_aspect_ratio (0.1/10)  min/max_bytes  allowed_formats
  embedding_dim (most common)  norm_tolerance (0.001)  min_recall_at_10 (0.9)
  result_format (BASIC)  sample_failing_values (0)  cache_above_mb (64)  adaptive_query_execution (false)
  arrow_fallback_for_s3 (false)"""


def add_validate_commands(sub) -> None:
    # Great Expectations and pyarrow: kept out of the CLI's import time
    from pipelines.validate import STAGES

    p = sub.add_parser("validate", help="run a stage's expectation suite and the gates before publish",
                       description=DESCRIPTION, epilog=f"{THRESHOLDS}\n\n{EPILOG}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", required=True, metavar="ID", help="the run to validate (as given to `crawl --run-id`)")
    p.add_argument("--stage", required=True, choices=STAGES,
                   help="which stage's output to validate: " + ", ".join(STAGES))
    p.add_argument("--force", action="store_true",
                   help="let the run go on although a gate tripped; the report records outcome 'forced' and the "
                        "gates that tripped. Row-level quarantine still applies")
    p.add_argument("--model-version", metavar="V",
                   help="embeddings stage: the model version under embeddings/ to validate "
                        "(default: the one in runs/<RUN_ID>/embed/_SUCCESS.json)")
    p.add_argument("--index-stats", metavar="URI",
                   help="index stage: a JSON file with a \"shards\" list, each with shard (or shard_id), "
                        "vector_count (or vectors) and recall_at_10; a build's _build.json works "
                        "(default: the newest indexes/<name>/<snapshot>/_build.json of this run)")
    p.add_argument("--expected-vectors", type=int, metavar="N",
                   help="index stage: vectors the index must hold (default: one per category and canonical "
                        "image of dedup/<RUN_ID>/images.parquet that passed embeddings validation)")
    add_common_flags(p)
    p.set_defaults(func=cmd_validate)


def cmd_validate(args) -> int:
    import json

    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.storage import read_uri_bytes
    from pipelines.validate import GateFailed, validate_stage

    settings = settings_from_args(args)
    inputs = {}
    if args.stage == "embeddings" and args.model_version:
        inputs["model_version"] = args.model_version
    if args.stage == "index":
        if args.index_stats:
            inputs["shard_stats"] = json.loads(read_uri_bytes(args.index_stats, settings.s3))["shards"]
        if args.expected_vectors is not None:
            inputs["expected_vectors"] = args.expected_vectors
    console.print(f"validate [bold]{args.stage}[/] of run [bold]{args.run_id}[/] in {settings.warehouse}")
    spark = spark_factory(args, settings, f"catalog-index validate {args.stage} {args.run_id}")
    if spark is None:
        raise ValueError("validate runs Great Expectations on Spark: use --runner spark (the default)")
    try:
        result = validate_stage(settings, args.run_id, args.stage, spark=spark, force=args.force, **inputs)
    except GateFailed as exc:
        print_validation(exc.results)
        console.print(f"[red]validation stopped the run:[/] {exc}", highlight=False, soft_wrap=True)
        return 1
    print_validation(result)
    if result.outcome == "forced":
        console.print(f"[yellow]forced:[/] gates {', '.join(g.name for g in result.tripped)} tripped and were "
                      f"overridden with --force (recorded in {result.report_key})", soft_wrap=True)
    return 0


def _observed(entry: dict) -> str:
    result = entry["result"]
    if "unexpected_count" in result:
        return f"{result['unexpected_count']:,} of {result.get('element_count') or 0:,} rows"
    value = result.get("observed_value", entry.get("exception") or "")
    if isinstance(value, list):
        return f"{len(value)} values"
    return str(value)


def print_validation(result) -> None:
    from rich.table import Table


    table = Table(title=f"validate {result.stage} {result.run_id}: {result.outcome}", show_header=True)
    table.add_column("expectation", overflow="fold")
    table.add_column("result", no_wrap=True)
    table.add_column("failing / observed", justify="right", no_wrap=True)
    for e in result.expectations:
        if e["success"]:
            mark = "[green]ok"
        else:
            mark = f"[yellow]flagged ({e['severity']})" if e["severity"] != "critical" else "[red]failed"
        table.add_row(e["expectation"], mark, _observed(e))
    console.print(table)
    for gate in result.gates:
        mark = "[green]held[/]" if gate.passed else "[red]TRIPPED[/]"
        console.print(f"gate {gate.name} {mark}: {gate.message}", highlight=False, soft_wrap=True)
    a = result.accounting
    if a.get("input_rows") is not None:
        reasons = ", ".join(f"{r} {n:,}" for r, n in a["quarantine_reasons"].items())
        console.print(f"{a['input_rows']:,} rows: {a['passed_rows']:,} passed, {a['quarantined_rows']:,} quarantined"
                      + (f" ({reasons})" if reasons else ""), highlight=False, soft_wrap=True)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    console.print(f"report: {result.report_key}; Data Docs: {result.data_docs}", highlight=False, soft_wrap=True)
