"""`catalog-index dedup`, `hash`, `near-duplicates`: the command line of the dedup stage and its folder tools."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from pipelines.cli.common import (
    EPILOG,
    add_common_flags,
    settings_from_args,
    spark_factory,
)
from pipelines.config import CrawlSettings
from pipelines.progress import console


def add_dedup_commands(sub) -> None:
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
    add_common_flags(p)
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
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.dedup.stage import run_dedup

    settings = settings_from_args(args, dedup={"max_distance": args.max_distance, "confirm_threshold": args.confirm_threshold})
    console.print(f"dedup run [bold]{args.run_id}[/] in {settings.warehouse}")
    summary = run_dedup(settings, args.run_id, runner=args.runner, spark=spark_factory(args, settings,
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
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.dedup.folder_tools import hash_inputs

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

    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.dedup.folder_tools import hash_inputs, near_duplicate_pairs

    source = Path(args.input)
    hashes = hash_inputs(str(source)) if source.is_dir() else pd.read_parquet(source)
    pairs = near_duplicate_pairs(hashes, args.max_distance, confirm=not args.no_confirm, threshold=args.threshold)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    pairs.to_parquet(args.output, index=False)
    confirmed = int(pairs["confirmed"].sum()) if "confirmed" in pairs else len(pairs)
    console.print(f"{len(hashes):,} images: {len(pairs):,} pairs within {args.max_distance} bits, "
                  f"{confirmed:,} confirmed -> {args.output}")
    return 0
