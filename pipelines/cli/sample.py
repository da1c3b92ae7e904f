"""`catalog-index sample manifest|serve`: the bundled sample catalog."""
from __future__ import annotations

from pathlib import Path

from pipelines.progress import console


def add_sample_commands(sub) -> None:
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
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.sample_catalog import build_sample_manifest, write_manifest_csv

    size = None if args.size == "all" else int(args.size)
    rows = build_sample_manifest(args.base_url, size)
    path = write_manifest_csv(rows, Path(args.output))
    categories = len({r["category"] for r in rows})
    products = len({r["product_id"] for r in rows})
    console.print(f"wrote {path}: {len(rows):,} images of {products:,} products in {categories} categories")
    return 0


def cmd_sample_serve(args) -> int:
    # pandas/pyarrow/boto3: kept out of the CLI's import time (`--help` answers in 0.3 s)
    from pipelines.sample_catalog import OPENCLIPART_DIR, serve_forever

    serve_forever(Path(args.root) if args.root else OPENCLIPART_DIR, args.host, args.port)
    return 0
