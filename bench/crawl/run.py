"""Crawl throughput: catalog-index's Spark crawl vs img2dataset, same URLs, same server, same concurrency.

    .venv/bin/python bench/crawl/run.py [--images 2000] [--repeats 3] [--threads 16] [--timeout 60]

Both tools download the same sample-catalog URLs from one local HTTP server (its own
process) with 2 parallel workers (Spark local[2] tasks / img2dataset processes) of
`--threads` threads each, no resizing. img2dataset runs from its own virtualenv
(bench/.venv-img2dataset, created on first use) because it needs a different pyarrow.
Runs alternate between the tools; the script prints every run, the medians and the ratio.

What each tool does per image differs, and the table says so: catalog-index checks
every body (magic bytes, pixel cap, a full decode), hashes it and writes Parquet;
img2dataset with resize_mode=no decodes and re-encodes unless disable_all_reencoding.

The row "10 hostile rows mixed in" is catalog-index on the same manifest plus ten rows
served by tests/fault_server.py (its own process, another port): a body trickled forever,
headers trickled forever, a silent server, bad gzip, a gzip bomb, a redirect to the cloud
metadata address, a malformed Location, a 503, a non-HTTP answer and a 10 MB URL. Its
figures: the wall time added to the clean crawl, against the documented bound
(retries + 1) * total_timeout_s + retries * max_backoff_s, and the good-row rate (good
images fetched per second while good images were being fetched: first to last fetch
start) against the clean crawl's.
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


HOSTILE_SERVER = r"""
import sys, threading
sys.path.insert(0, sys.argv[1])
from fault_server import FaultServer
FaultServer("127.0.0.1", int(sys.argv[2])).start()
threading.Event().wait()
"""


def start_server(port: int, hostile: bool = False) -> subprocess.Popen:
    command = ([sys.executable, "-c", HOSTILE_SERVER, str(ROOT / "tests"), str(port)] if hostile else
               [str(Path(sys.executable).parent / "catalog-index"), "sample", "serve", "--port", str(port)])
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("sample server did not start")


def hostile_rows(base: str, categories: list[str]) -> list[dict[str, str]]:
    paths = ["trickle-body", "trickle-headers", "hang", "bad-gzip", "gzip-bomb/64",
             "redirect?to=http://169.254.169.254/latest/meta-data/", "redirect?to=http://[oops/x", "status/503",
             "not-http"]
    urls = [f"{base}/{path}" for path in paths] + [f"{base}/img/x.png?" + "a" * 10_000_000]
    return [{"product_id": f"hostile-{i}", "category": categories[i % len(categories)], "image_url": url,
             "title": "hostile"} for i, url in enumerate(urls)]


def run_ours(spark, manifest: Path, threads: int, work: Path, timeout: float, rows_per_task: int) -> dict:
    from pipelines.config import load_settings
    from pipelines.crawl.stage import read_crawl_state, run_crawl
    from pipelines.storage import open_storage

    warehouse = work / f"wh-{time.monotonic_ns()}"
    settings = load_settings(warehouse=warehouse.as_uri(), crawl={
        "allow_private_hosts": True, "concurrency": threads, "per_host_concurrency": threads, "retries": 1,
        "total_timeout_s": timeout, "rows_per_task": rows_per_task})
    start = time.perf_counter()
    summary = run_crawl(settings, str(manifest), "bench", spark=spark)
    elapsed = time.perf_counter() - start
    state = read_crawl_state(open_storage(warehouse.as_uri()), "bench")
    fetched = state[state["status"] == "fetched"]["checked_at"]
    span = (fetched.max() - state["checked_at"].min()).total_seconds() if len(fetched) else float("nan")
    shutil.rmtree(warehouse, ignore_errors=True)
    return {"elapsed": elapsed, "ok": summary.fetched, "span": span, "bound": settings.crawl.worst_case_s,
            "quarantined": summary.quarantine_reasons, "accounted": summary.accounted == summary.manifest_rows}


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
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="catalog-index crawl.total_timeout_s (default 60, the setting's default)")
    parser.add_argument("--no-img2dataset", action="store_true",
                        help="run the two catalog-index rows only (clean and hostile)")
    args = parser.parse_args()
    # Two Spark tasks for both manifests (the hostile one has 10 more rows): same parallelism.
    rows_per_task = max(1000, args.images)
    os.environ["CATALOG_INDEX_NO_PROGRESS"] = "1"

    from pipelines.config import load_settings
    from pipelines.sample_catalog import build_sample_manifest, write_manifest_csv
    from pipelines.spark import get_spark

    python = None if args.no_img2dataset else ensure_img2dataset()
    work = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    port, hostile_port = free_port(), free_port()
    server, hostile = start_server(port), start_server(hostile_port, hostile=True)
    clean, mixed = "catalog-index", "catalog-index, 10 hostile rows mixed in"
    try:
        rows = build_sample_manifest(f"http://127.0.0.1:{port}", args.images)
        manifest = write_manifest_csv(rows, work / "manifest.csv")
        bad = hostile_rows(f"http://127.0.0.1:{hostile_port}", sorted({r["category"] for r in rows}))
        spread = list(rows)
        for i, row in enumerate(bad):  # spread through the manifest, so through the tasks
            spread.insert((i + 1) * len(spread) // (len(bad) + 1), row)
        hostile_manifest = write_manifest_csv(spread, work / "manifest-hostile.csv")
        spark = get_spark(load_settings(spark={"master": "local[2]"}), "bench-crawl")
        run_ours(spark, manifest, args.threads, work, args.timeout, rows_per_task)  # warm-up: JVM, Python workers, page cache
        ours: dict[str, list[dict]] = {clean: [], mixed: []}
        theirs: dict[str, list[tuple[float, int]]] = {"img2dataset": [], "img2dataset (no re-encode)": []}
        for i in range(args.repeats):
            ours[clean].append(run_ours(spark, manifest, args.threads, work, args.timeout, rows_per_task))
            ours[mixed].append(run_ours(spark, hostile_manifest, args.threads, work, args.timeout, rows_per_task))
            if python:
                theirs["img2dataset"].append(run_img2dataset(python, manifest, args.threads, work, False))
                theirs["img2dataset (no re-encode)"].append(
                    run_img2dataset(python, manifest, args.threads, work, True))
            print(f"round {i + 1}: " + ", ".join(
                [f"{k} {v[-1]['elapsed']:.1f}s ({v[-1]['ok']} ok)" for k, v in ours.items()]
                + [f"{k} {v[-1][0]:.1f}s ({v[-1][1]} ok)" for k, v in theirs.items() if v]), flush=True)
            print(f"  hostile rows quarantined as {ours[mixed][-1]['quarantined']}; every row accounted for: "
                  f"{ours[mixed][-1]['accounted']}", flush=True)
    finally:
        server.terminate()
        hostile.terminate()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.images} images, 2 workers x {args.threads} threads, one local HTTP server, "
          f"{args.repeats} runs each (median); catalog-index total_timeout_s={args.timeout:g}, retries=1")
    print(f"{'tool':42} {'median s':>9} {'images/s':>9} {'ok':>6}")
    rates = {}
    for name, runs in ours.items():
        median = statistics.median(r["elapsed"] for r in runs)
        rates[name] = runs[0]["ok"] / median
        print(f"{name:42} {median:9.2f} {rates[name]:9.1f} {runs[0]['ok']:6d}")
    theirs = {name: runs for name, runs in theirs.items() if runs}
    for name, runs in theirs.items():
        median = statistics.median(t for t, _ in runs)
        rates[name] = runs[0][1] / median
        print(f"{name:42} {median:9.2f} {rates[name]:9.1f} {runs[0][1]:6d}")
    for name in theirs:
        print(f"ratio catalog-index / {name}: {rates[clean] / rates[name]:.2f}x")
    added = statistics.median(r["elapsed"] for r in ours[mixed]) - statistics.median(r["elapsed"] for r in ours[clean])
    bound = ours[mixed][0]["bound"]
    good_rate = {k: statistics.median(r["ok"] / r["span"] for r in v) for k, v in ours.items()}
    print(f"hostile rows: +{added:.1f}s wall time (bound (retries + 1) * total_timeout_s + retries * max_backoff_s "
          f"= {bound:g}s); good-row rate {good_rate[mixed]:.1f}/s vs {good_rate[clean]:.1f}/s clean "
          f"({100 * (good_rate[mixed] / good_rate[clean] - 1):+.1f}%)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
