"""Crawl throughput: catalog-index's Spark crawl vs img2dataset, same URLs, same server, same concurrency.

    .venv/bin/python bench/crawl/run.py [--images 2000] [--repeats 3] [--threads 16]

Both tools download the same sample-catalog URLs from one local HTTP server (its own
process) with 2 parallel workers (Spark local[2] tasks / img2dataset processes) of
`--threads` threads each, no resizing. img2dataset runs from its own virtualenv
(bench/.venv-img2dataset, created on first use) because it needs a different pyarrow.
Runs alternate between the tools; the script prints every run, the medians and the ratio.

What each tool does per image differs, and the table says so: catalog-index checks
every body (magic bytes, pixel cap, a full decode), hashes it and writes Parquet;
img2dataset with resize_mode=no decodes and re-encodes unless disable_all_reencoding.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
I2D_VENV = ROOT / "bench" / ".venv-img2dataset"
I2D_VERSION = "1.47.0"

I2D_SCRIPT = r"""
import json, sys, time
from img2dataset import download
args = json.loads(sys.argv[1])
start = time.perf_counter()
download(url_list=args["url_list"], input_format="csv", url_col="image_url", output_folder=args["out"],
         output_format="parquet", processes_count=2, thread_count=args["threads"], resize_mode="no",
         disable_all_reencoding=args["no_reencode"], timeout=30, retries=1, number_sample_per_shard=1000,
         distributor="multiprocessing", enable_wandb=False, compute_hash="sha256")
elapsed = time.perf_counter() - start
import glob, pyarrow.parquet as pq
ok = sum(int((t := pq.read_table(f, columns=["status"])).filter(__import__("pyarrow").compute.equal(t["status"], "success")).num_rows)
         for f in glob.glob(args["out"] + "/*.parquet"))
print(json.dumps({"elapsed": elapsed, "ok": ok}))
"""


def ensure_img2dataset() -> Path:
    python = I2D_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {I2D_VENV} with img2dataset=={I2D_VERSION} (first run only)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"img2dataset=={I2D_VERSION}"], check=True)
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "catalog-index"), "sample", "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("sample server did not start")


def run_ours(spark, manifest: Path, threads: int, work: Path) -> tuple[float, int]:
    from pipelines.config import load_settings
    from pipelines.crawl.stage import run_crawl

    warehouse = work / f"wh-{time.monotonic_ns()}"
    settings = load_settings(warehouse=warehouse.as_uri(), crawl={
        "allow_private_hosts": True, "concurrency": threads, "per_host_concurrency": threads, "retries": 1})
    start = time.perf_counter()
    summary = run_crawl(settings, str(manifest), "bench", spark=spark)
    elapsed = time.perf_counter() - start
    shutil.rmtree(warehouse, ignore_errors=True)
    return elapsed, summary.fetched


def run_img2dataset(python: Path, manifest: Path, threads: int, work: Path, no_reencode: bool) -> tuple[float, int]:
    out = work / f"i2d-{time.monotonic_ns()}"
    args = {"url_list": str(manifest), "out": str(out), "threads": threads, "no_reencode": no_reencode}
    proc = subprocess.run([str(python), "-c", I2D_SCRIPT, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"img2dataset failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result["elapsed"], result["ok"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="sample images to crawl (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool (default 3)")
    parser.add_argument("--threads", type=int, default=16, help="threads per worker, both tools (default 16)")
    args = parser.parse_args()
    os.environ["CATALOG_INDEX_NO_PROGRESS"] = "1"

    from pipelines.config import load_settings
    from pipelines.sample_catalog import build_sample_manifest, write_manifest_csv
    from pipelines.spark import get_spark

    python = ensure_img2dataset()
    work = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    port = free_port()
    server = start_server(port)
    try:
        manifest = write_manifest_csv(build_sample_manifest(f"http://127.0.0.1:{port}", args.images),
                                      work / "manifest.csv")
        spark = get_spark(load_settings(spark={"master": "local[2]"}), "bench-crawl")
        run_ours(spark, manifest, args.threads, work)  # warm-up: JVM, Python workers, page cache
        results: dict[str, list[tuple[float, int]]] = {"catalog-index": [], "img2dataset": [],
                                                        "img2dataset (no re-encode)": []}
        for i in range(args.repeats):
            results["catalog-index"].append(run_ours(spark, manifest, args.threads, work))
            results["img2dataset"].append(run_img2dataset(python, manifest, args.threads, work, False))
            results["img2dataset (no re-encode)"].append(run_img2dataset(python, manifest, args.threads, work, True))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f}s ({v[-1][1]} ok)" for k, v in results.items()),
                  flush=True)
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.images} images, 2 workers x {args.threads} threads, one local HTTP server, "
          f"{args.repeats} runs each (median)")
    print(f"{'tool':32} {'median s':>9} {'images/s':>9} {'ok':>6}")
    ours = None
    rates = {}
    for name, runs in results.items():
        median = statistics.median(t for t, _ in runs)
        ok = runs[0][1]
        rates[name] = ok / median
        ours = ours or rates[name]
        print(f"{name:32} {median:9.2f} {rates[name]:9.1f} {ok:6d}")
    for name in list(results)[1:]:
        print(f"ratio catalog-index / {name}: {rates['catalog-index'] / rates[name]:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
