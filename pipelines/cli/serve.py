"""`catalog-index serve` (the HTTP search service) and `catalog-index score` (re-measure a pulled
snapshot's recall@10 and search latency).

Flags become `pipelines.serve.ServeSettings`; the service itself lives in `pipelines.serve`.
Neither command starts Spark. Exit codes: 0 success, 1 `score` measured recall under the
snapshot's own threshold, 2 usage error.
"""
from __future__ import annotations

import argparse
import json
import sys

from rich.table import Table

from pipelines.cli.common import EPILOG
from pipelines.config import load_settings
from pipelines.progress import console

SERVE_EXAMPLES = """examples:
  catalog-index serve --snapshot-dir /srv/catalog-index            # follow what `pull` puts there
  catalog-index serve --warehouse s3://search/warehouse --api-key-file /etc/catalog-index/key
  curl -F image=@shoe.jpg 'http://127.0.0.1:8000/v1/search?k=10&category=shoes'

""" + EPILOG


def add_serve_commands(sub) -> None:
    _add_serve(sub)
    _add_score(sub)


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="HTTP search service that follows the live snapshot (FastAPI + uvicorn)",
        description="Serve visual search over the live snapshot: POST /v1/search (a photo upload, an image URL or "
                    "a vector), GET /v1/similar/{product_id}, /v1/snapshot, /healthz, /readyz, /metrics "
                    "(Prometheus), /docs (OpenAPI) and a search page at /. Every --refresh-s it resolves LATEST "
                    "(--warehouse: pulls with checksum verification into --cache-dir; --snapshot-dir: follows "
                    "DIR/current), opens the new snapshot memory-mapped beside the live one and swaps between "
                    "requests. A snapshot that fails verification or loading is refused; the old one keeps "
                    "serving and /metrics counts the refusal.",
        epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--warehouse", metavar="URI",
                       help="follow indexes/<name>/LATEST of this warehouse (file:///path or s3://bucket/prefix), "
                            "pulling each new snapshot into --cache-dir")
    where.add_argument("--snapshot-dir", metavar="DIR",
                       help="follow DIR/current of a `catalog-index pull --dest DIR` destination (or serve DIR "
                            "itself when it is one snapshot directory)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for "
                                                       "every interface: set --api-key-file then)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--refresh-s", type=float, default=30.0, metavar="S",
                   help="seconds between checks for a new snapshot (default 30)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="worker processes on one port (default 1; on a CPU host one worker per 4 cores or so). "
                        "Each loads its own model and follows the snapshot on its own, and takes connections "
                        "once its snapshot is loaded; the memory-mapped shards are shared through the page "
                        "cache. A worker that dies is restarted; SIGTERM stops all. /metrics counts the whole "
                        "service (snapshot gauges: one series per worker, label pid = the X-Worker header)")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="require `Authorization: Bearer <key>` (key = first line of FILE) on everything but "
                        "/healthz; browsers get a login prompt where the key is the password")
    g = p.add_argument_group("limits")
    g.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                   help="largest request body or image_url download (default 10); larger: 413")
    g.add_argument("--max-pixels", type=int, default=50_000_000, metavar="N",
                   help="largest query image in pixels (width x height, from its header; default 50M); "
                        "larger: 413 decompression_bomb")
    g.add_argument("--max-k", type=int, default=100, metavar="K", help="largest k a request may ask for (default 100)")
    g.add_argument("--allow-private-image-urls", action="store_true",
                   help="let image_url name loopback/private addresses (demos on one machine; never on a "
                        "public service: it would let callers reach internal hosts)")
    g = p.add_argument_group("snapshot source")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where --warehouse pulls to (default ~/.catalog-index/snapshots/<index>)")
    g.add_argument("--index-name", default="catalog", metavar="NAME", help="index under indexes/<NAME>/ (default catalog)")
    g.add_argument("--s3-endpoint-url", metavar="URL", help="S3-compatible endpoint for s3:// warehouses (default AWS)")
    g.add_argument("--config", metavar="FILE", help="YAML settings file for the S3 settings (default: $CATALOG_INDEX_CONFIG)")
    g.add_argument("--device", default="cpu", help="torch device for query images: cpu (default) or cuda")
    g.add_argument("--embed-threads", type=int, metavar="N",
                   help="threads running the model, each embedding every query image waiting at once (default 4 on "
                        "a CPU, 2 on cuda): several keep the cores busy while the next images decode; per worker")
    p.set_defaults(func=cmd_serve)


def serve_settings_from(args):
    # pipelines.serve imports FastAPI and Arrow: kept out of the CLI's import time (`--help`)
    from pipelines.serve import ServeSettings
    from pipelines.serve.settings import read_api_key

    s3 = load_settings(args.config, s3={"endpoint_url": args.s3_endpoint_url}).s3.model_dump()
    return ServeSettings(
        warehouse=args.warehouse, snapshot_dir=args.snapshot_dir, index_name=args.index_name,
        cache_dir=args.cache_dir, s3=s3, host=args.host, port=args.port, refresh_s=args.refresh_s,
        workers=args.workers, api_key=read_api_key(args.api_key_file) if args.api_key_file else None,
        max_upload_bytes=int(args.max_upload_mb * 1_000_000), max_pixels=args.max_pixels, max_k=args.max_k,
        allow_private_image_urls=args.allow_private_image_urls, device=args.device,
        embed_threads=args.embed_threads)


def cmd_serve(args) -> int:
    # uvicorn, FastAPI, faiss: kept out of the CLI's import time (`--help`)
    from pipelines.serve import run_server

    settings = serve_settings_from(args)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        console.print(f"[yellow]warning:[/] listening on {settings.host} without --api-key-file: anyone who "
                      "reaches this port can search")
    source = settings.warehouse or settings.snapshot_dir
    console.print(f"serving {source} on http://{settings.host}:{settings.port} (page /, API docs /docs), "
                  f"checking for new snapshots every {settings.refresh_s:g}s")
    run_server(settings)
    return 0


def _add_score(sub) -> None:
    p = sub.add_parser(
        "score", help="re-measure recall@10 and search latency of a pulled snapshot on this host",
        description="For each shard: sample its vectors as queries, compare the index's top-10 at the snapshot's "
                    "search parameters with exact search over the shard, and time one query at a time (raw FAISS "
                    "per shard, and end to end across shards with the merge). Prints the figures beside those the "
                    "build recorded in the manifest. Exit 1 when a shard's recall@10 is under the snapshot's "
                    "threshold (index.min_recall of its build).", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--snapshot-dir", required=True, metavar="DIR",
                   help="a pulled destination (uses its current) or a snapshot directory")
    p.add_argument("--queries", type=int, default=200, metavar="N", help="query vectors per shard (default 200)")
    p.add_argument("--json", action="store_true", help="print the scores as one JSON object on stdout")
    p.set_defaults(func=cmd_score)


def cmd_score(args) -> int:
    from dataclasses import asdict

    # faiss and pyarrow: kept out of the CLI's import time (`--help`)
    from pipelines.client import SnapshotClient
    from pipelines.serve.score import score_snapshot

    if args.queries < 1:
        raise ValueError("--queries must be at least 1")
    client = SnapshotClient(args.snapshot_dir, verify=None, mmap=True)
    score = score_snapshot(client.snapshot, args.queries)
    if args.json:
        sys.stdout.write(json.dumps({**asdict(score), "passed": score.passed}) + "\n")
        sys.stdout.flush()
        return 0 if score.passed else 1
    table = Table(title=f"snapshot {score.snapshot_id}: recall@10 and latency of one query (ms), measured here "
                        "vs recorded by the build")
    for column in ("shard", "index", "vectors", "queries", "recall@10", "build recall", "p50", "p99",
                   "build p50", "build p99"):
        table.add_column(column, justify="left" if column in ("shard", "index") else "right")
    for s in score.shards:
        built = s.manifest_latency_ms or {}
        ok = s.recall_at_10 >= score.threshold
        table.add_row(s.shard_id, s.index_type, f"{s.vectors:,}", str(s.queries),
                      f"{'' if ok else '[red]'}{s.recall_at_10:.3f}", f"{s.manifest_recall_at_10:.3f}",
                      f"{s.p50_ms:.3f}", f"{s.p99_ms:.3f}", f"{built.get('p50', float('nan')):.3f}",
                      f"{built.get('p99', float('nan')):.3f}")
    console.print(table)
    console.print(f"end to end (every shard + merge, one query at a time): p50 {score.search_p50_ms:.3f} ms, "
                  f"p99 {score.search_p99_ms:.3f} ms; threshold recall@10 {score.threshold}: "
                  + ("[green]passed[/]" if score.passed else "[red]below[/]"))
    return 0 if score.passed else 1
