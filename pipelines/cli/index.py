"""`catalog-index` subcommands of the index and serving side: build-index, publish, snapshots,
rollback, pull, search.

Each command turns flags into settings and calls one library function (pipelines.index,
pipelines.publish, pipelines.client). No stage logic lives here. `pull` and `search` never
start Spark. Exit codes follow pipelines.cli: 0 success, 1 stopped by a gate or a failed
verification, 2 usage or configuration error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.table import Table

from pipelines.cli.common import (
    EPILOG,
    add_common_flags,
    settings_from_args,
    spark_factory,
)
from pipelines.config import IndexSettings
from pipelines.decode import IMAGE_SUFFIXES
from pipelines.progress import console

DEFAULT_PULL_CACHE = Path.home() / ".catalog-index" / "snapshots"


def add_index_commands(sub) -> None:
    _add_build_index(sub)
    _add_publish(sub)
    _add_snapshots(sub)
    _add_rollback(sub)
    _add_pull(sub)
    _add_search(sub)


def _serving_common(parser: argparse.ArgumentParser, warehouse_required: bool = False) -> None:
    """Flags of commands that only talk to the warehouse (no Spark)."""
    g = parser.add_argument_group("common settings")
    g.add_argument("--config", metavar="FILE", help="YAML settings file (default: $CATALOG_INDEX_CONFIG)")
    if warehouse_required is not None:
        g.add_argument("--warehouse", metavar="URI", required=warehouse_required,
                       help="warehouse root: file:///path or s3://bucket/prefix (default: ~/.catalog-index/warehouse)")
    g.add_argument("--s3-endpoint-url", metavar="URL",
                   help="S3-compatible endpoint for s3:// URIs (MinIO, Ceph, moto); default AWS")
    g.add_argument("--index-name", metavar="NAME", help="index under indexes/<NAME>/ (default: index.name, 'catalog')")
    parser.set_defaults(spark_master=None)


def _index_settings(args, **flags):
    # faiss and pyarrow: kept out of the CLI's import time
    from pipelines.index import index_settings_from

    settings = settings_from_args(args)
    current = index_settings_from(settings).model_dump()
    updates = {"name": getattr(args, "index_name", None), **flags}
    cfg = IndexSettings.model_validate({**current, **{k: v for k, v in updates.items() if v is not None}})
    return settings, cfg


def _storage(settings):
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.storage import open_storage

    return open_storage(settings.warehouse, settings.s3)


# ---------------------------------------------------------------------------------------
# build-index
# ---------------------------------------------------------------------------------------

def _add_build_index(sub) -> None:
    p = sub.add_parser(
        "build-index", help="build the sharded FAISS index of a dedup run (not yet visible to readers)",
        description="Build one snapshot directory under indexes/<name>/: shards packed by category, index type "
                    "per shard from its size and the memory budget, one Spark task per shard, recall@10 checked "
                    "per shard against exact search. Below index.min_recall the run stops (exit 1) and nothing "
                    "can be published. `publish` makes the build live.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-id", metavar="ID", help="committed dedup run to index (default: the newest committed one)")
    p.add_argument("--categories", nargs="+", metavar="C",
                   help="backfill: rebuild only the shards holding these categories (and those that products of the "
                        "run's crawl moved from or to); copy every other shard of the live snapshot byte for byte")
    p.add_argument("--model-version", metavar="V",
                   help="index embeddings/<V>/ (default: the installed model's version). A version this "
                        "installation cannot reproduce gives a snapshot searchable by vector only")
    g = p.add_argument_group("index settings (also settable in the config file under index:)")
    g.add_argument("--index-name", metavar="NAME", help="snapshots go under indexes/<NAME>/ (default catalog)")
    g.add_argument("--max-vectors-per-shard", type=int, metavar="N", help="default 1,000,000")
    g.add_argument("--memory-budget-mb", type=int, metavar="MB",
                   help="RAM one shard's index may take when served; picks Flat/HNSW/IVF-Flat/IVF-SQ8/IVF-PQ "
                        "(default 4096)")
    g.add_argument("--min-recall", type=float, metavar="R", help="recall@10 gate per shard (default 0.90)")
    g.add_argument("--target-recall", type=float, metavar="R", help="recall@10 nprobe/efSearch are tuned to (default 0.98)")
    add_common_flags(p)
    p.set_defaults(func=cmd_build_index)


def cmd_build_index(args) -> int:
    # faiss and pyarrow: kept out of the CLI's import time
    from pipelines.index import IndexCheckFailed, build_index, model_for_version
    from pipelines.publish import holding_live_snapshot
    from pipelines.readers import backfill_index_scope, require_committed_dedup

    settings, cfg = _index_settings(args, max_vectors_per_shard=args.max_vectors_per_shard,
                                    memory_budget_mb=args.memory_budget_mb, min_recall=args.min_recall,
                                    target_recall=args.target_recall)

    storage = _storage(settings)
    run_id = require_committed_dedup(storage, args.run_id)  # only a committed dedup output is indexed
    categories = backfill_index_scope(storage, run_id, args.categories)
    model = model_for_version(args.model_version)
    console.print(f"build-index [bold]{cfg.name}[/] from dedup run {run_id} -> {settings.warehouse}"
                  + (f" (categories: {', '.join(categories)})" if categories else ""))
    try:
        with holding_live_snapshot(storage, cfg.name):  # retention must not delete the shards being copied
            result = build_index(settings, run_id, model=model, categories=categories, cfg=cfg,
                                 runner=args.runner, spark=spark_factory(args, settings, "catalog-index build-index"))
    except IndexCheckFailed as exc:
        console.print(f"[red]index check failed:[/] {exc}")
        return 1
    print_build(result.report)
    console.print(f"built snapshot [bold]{result.snapshot_id}[/] of run {result.run_id}: {result.vectors:,} vectors, "
                  f"{result.products:,} products, {result.missing_embeddings:,} images without a vector "
                  f"(quarantined), {result.reused_shards} shard(s) reused, {result.seconds:.1f}s. "
                  f"Next: catalog-index publish --run-id {result.run_id}")
    return 0


def print_build(report: dict) -> None:
    table = Table(title=f"index {report['index_name']} snapshot {report['snapshot_id']} ({report['status']})")
    for column in ("shard", "categories", "index", "vectors", "products", "search", "recall@10", "MB", "s"):
        table.add_column(column, justify="right" if column in ("vectors", "products", "recall@10", "MB", "s") else "left")
    for shard in report["shards"]:
        categories = ", ".join(shard["categories"])
        table.add_row(shard["shard_id"], categories if len(categories) < 40 else categories[:37] + "...",
                      shard["faiss_factory"] + (" (reused)" if shard.get("reused_from") else ""),
                      f"{shard['vectors']:,}", f"{shard['products']:,}",
                      " ".join(f"{k}={v}" for k, v in shard["search_params"].items()) or "exact",
                      f"{shard['recall_at_10']:.3f}", f"{shard['files']['index']['bytes'] / 1e6:,.1f}",
                      f"{shard.get('build_seconds') or 0:.1f}")
    console.print(table)


# ---------------------------------------------------------------------------------------
# publish / snapshots / rollback
# ---------------------------------------------------------------------------------------

def _add_publish(sub) -> None:
    p = sub.add_parser(
        "publish", help="verify a build, write its manifest, then point LATEST at it",
        description="Re-read every shard file and id map of a passed build from the warehouse, check size and "
                    "sha256, write manifest.json, and only then move indexes/<name>/LATEST by compare-and-swap from "
                    "the snapshot the build started from (its base_snapshot). If LATEST moved meanwhile (another "
                    "publish, a backfill, a rollback), nothing is overwritten: exit 1, rebuild on the new live "
                    "snapshot. Rerunning a publish that stopped half way completes it; one whose snapshot is already "
                    "live succeeds. Old snapshots beyond index.keep_snapshots are deleted (never the one LATEST "
                    "points to, never a build younger than index.retention_grace_hours); a retention failure is "
                    "reported, not fatal.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--snapshot-id", metavar="ID",
                       help="the build to publish (default: the newest unpublished build that passed its recall "
                            "check and its index validation)")
    which.add_argument("--run-id", metavar="ID", help="publish the newest build of this run (or complete its publish)")
    p.add_argument("--keep", type=int, metavar="N", help="published snapshots to keep (default index.keep_snapshots, 5)")
    p.add_argument("--retention-grace-hours", type=float, metavar="H",
                   help="never delete an unpublished build or a held snapshot younger than this "
                        "(default index.retention_grace_hours, 24)")
    _serving_common(p)
    p.set_defaults(func=cmd_publish)


def cmd_publish(args) -> int:
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.publish import SnapshotVerificationError, publish_snapshot

    settings, cfg = _index_settings(args)
    try:
        result = publish_snapshot(
            _storage(settings), cfg.name, snapshot_id=args.snapshot_id, run_id=args.run_id,
            keep_snapshots=args.keep or cfg.keep_snapshots, min_recall=cfg.min_recall,
            retention_grace_hours=(args.retention_grace_hours if args.retention_grace_hours is not None
                                   else cfg.retention_grace_hours))
    except SnapshotVerificationError as exc:
        console.print(f"[red]not published:[/] {exc}")
        return 1
    totals = result.manifest["totals"]
    console.print(f"{'already live' if result.already_live else 'published'} [bold]{result.snapshot_id}[/] "
                  f"({totals['shards']} shards, {totals['vectors']:,} vectors, "
                  f"{totals['products']:,} products, min recall@10 {result.manifest['recall_at_10']['min']:.3f}); "
                  f"LATEST was {result.previous_snapshot or 'unset'}"
                  + (f"; retired {', '.join(result.deleted)}" if result.deleted else ""))
    if result.retention_error:
        console.print(f"[yellow]retention failed[/] (the snapshot is live; the next publish retries): "
                      f"{result.retention_error}")
    return 0


def _add_snapshots(sub) -> None:
    p = sub.add_parser("snapshots", help="list the snapshots of an index and which one is live",
                       description="Every snapshot directory under indexes/<name>/, oldest first: live (LATEST), "
                                   "published, built (not yet published), failed_recall_check or incomplete.")
    p.add_argument("--json", action="store_true", help="one JSON object per snapshot on stdout")
    _serving_common(p)
    p.set_defaults(func=cmd_snapshots)


def cmd_snapshots(args) -> int:
    from dataclasses import asdict

    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.publish import list_snapshots

    settings, cfg = _index_settings(args)
    infos = list_snapshots(_storage(settings), cfg.name)
    if args.json:
        for info in infos:
            print(json.dumps(asdict(info), sort_keys=True))
        return 0
    table = Table(title=f"snapshots of index {cfg.name} in {settings.warehouse}")
    for column in ("snapshot", "state", "run", "created", "shards", "vectors", "products", "min recall@10", "MB"):
        table.add_column(column)
    for info in infos:
        table.add_row(info.snapshot_id, f"[bold green]{info.state}[/]" if info.state == "live" else info.state,
                      info.source_run_id or "", info.created_at or "", str(info.shards or ""),
                      f"{info.vectors:,}" if info.vectors is not None else "",
                      f"{info.products:,}" if info.products is not None else "",
                      f"{info.min_recall:.3f}" if info.min_recall is not None else "",
                      f"{info.bytes / 1e6:,.1f}" if info.bytes else "")
    console.print(table)
    return 0


def _add_rollback(sub) -> None:
    p = sub.add_parser("rollback", help="point LATEST at an earlier published snapshot (after re-verifying it)",
                       description="Re-verify every file of a published snapshot against its manifest, then point "
                                   "LATEST at it by compare-and-swap from what LATEST named before verifying (exit 1, "
                                   "nothing changed, if a publish moved it meanwhile). Also repairs an unreadable "
                                   "LATEST. Serving hosts pick it up on their next `pull`.")
    p.add_argument("--to", required=True, metavar="ID", help="snapshot id (see `catalog-index snapshots`)")
    _serving_common(p)
    p.set_defaults(func=cmd_rollback)


def cmd_rollback(args) -> int:
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.publish import SnapshotVerificationError, rollback

    settings, cfg = _index_settings(args)
    try:
        manifest = rollback(_storage(settings), cfg.name, args.to)
    except SnapshotVerificationError as exc:
        console.print(f"[red]not rolled back:[/] {exc}")
        return 1
    console.print(f"LATEST of index {cfg.name} now points to [bold]{manifest['snapshot_id']}[/] "
                  f"(run {manifest['source_run_id']}, built {manifest['created_at']})")
    return 0


# ---------------------------------------------------------------------------------------
# pull / search
# ---------------------------------------------------------------------------------------

def _add_pull(sub) -> None:
    p = sub.add_parser("pull", help="download the live snapshot, verify every checksum, swap the local copy",
                       description="Resolve LATEST, download the snapshot into DEST/snapshots/<id>, verify every "
                                   "file's sha256 against the manifest, then atomically repoint DEST/current. Does "
                                   "nothing when DEST/current already is the live snapshot; refuses (exit 1, "
                                   "current untouched) a snapshot whose checksums fail.")
    p.add_argument("--dest", required=True, metavar="DIR", help="local directory for snapshots")
    _serving_common(p, warehouse_required=True)
    p.set_defaults(func=cmd_pull)


def cmd_pull(args) -> int:
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.client import pull
    from pipelines.publish import SnapshotVerificationError

    settings, cfg = _index_settings(args)
    try:
        result = pull(settings.warehouse, args.dest, s3=settings.s3, index_name=cfg.name)
    except SnapshotVerificationError as exc:
        console.print(f"[red]pull refused:[/] {exc}")
        return 1
    if result.changed:
        console.print(f"{args.dest}/current -> [bold]{result.snapshot_id}[/] (was {result.previous or 'empty'}), verified")
    else:
        console.print(f"{args.dest}/current is already {result.snapshot_id}; nothing to do")
    return 0


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="search a snapshot with query images; products best first",
                       description="Embed the query images with the snapshot's model version, search every shard "
                                   "that holds the category (all shards without --category), merge the top-k and "
                                   "return each product once. With --json: one line per query image, "
                                   '{"query": ..., "results": [{"product_id", "category", "score", "image_url"}, ...]}. '
                                   "Loads the model and shards once per call; starts no Spark.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--warehouse", metavar="URI", help="pull the live snapshot into --cache-dir first, then search it")
    where.add_argument("--snapshot-dir", metavar="DIR", help="a pulled destination (uses its current) or a snapshot dir")
    queries = p.add_mutually_exclusive_group(required=True)
    queries.add_argument("--image", nargs="+", metavar="PATH_OR_URL", help="query images: paths, http(s):// or s3:// URLs")
    queries.add_argument("--image-dir", metavar="DIR", help="every image file in DIR (sorted by name)")
    p.add_argument("--k", type=int, default=10, help="products per query (default 10)")
    p.add_argument("--category", metavar="C", help="only products of this category")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout (one object per query image)")
    p.add_argument("--cache-dir", metavar="DIR", help=f"where --warehouse pulls to (default {DEFAULT_PULL_CACHE}/<index>)")
    _serving_common(p, warehouse_required=None)
    p.set_defaults(func=cmd_search)


def _query_list(args) -> list[str]:
    if args.image:
        return list(args.image)
    folder = Path(args.image_dir)
    if not folder.is_dir():
        raise ValueError(f"--image-dir {folder} is not a directory")
    images = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"--image-dir {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def cmd_search(args) -> int:
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.client import SnapshotClient, pull

    if args.k < 1:
        raise ValueError("--k must be at least 1")
    queries = _query_list(args)
    settings, cfg = _index_settings(args)
    if args.warehouse:
        dest = Path(args.cache_dir) if args.cache_dir else DEFAULT_PULL_CACHE / cfg.name
        pulled = pull(settings.warehouse, dest, s3=settings.s3, index_name=cfg.name)
        console.print(f"searching snapshot {pulled.snapshot_id} ({'pulled' if pulled.changed else 'already local'})")
        snapshot_dir = dest
    else:
        snapshot_dir = Path(args.snapshot_dir)
    client = SnapshotClient(snapshot_dir)
    results = client.search_images(queries, k=args.k, category=args.category)
    for result in results:
        if args.json:
            sys.stdout.write(json.dumps(result.to_json()) + "\n")
        else:
            table = Table(title=result.query + (f" ([red]{result.error}[/])" if result.error else ""))
            for column in ("rank", "product", "category", "score", "image"):
                table.add_column(column)
            for rank, hit in enumerate(result.results, start=1):
                table.add_row(str(rank), hit.product_id, hit.category, f"{hit.score:.4f}", hit.image_url)
            console.print(table)
    sys.stdout.flush()
    return 1 if results and all(r.error for r in results) else 0
