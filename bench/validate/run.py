"""Validation cost as a share of the crawl: catalog-index's crawl vs its manifest + images validation.

    .venv/bin/python bench/validate/run.py [--images 2000|all] [--repeats 3] [--threads 16]

On the sample catalog served over local HTTP (its own process), each round crawls into a
fresh warehouse twice, on one Spark session (local[2]):
  night 1: a first crawl (every image downloaded), then `validate manifest` and `validate images`;
  night 2: the incremental re-crawl (conditional requests, nothing downloaded), then both again.
Validation includes everything the CLI does after Spark is up: Great Expectations on Spark,
failing rows to quarantine, gates, the JSON report and the Data Docs HTML. One warm-up round
(JVM, Python workers, GX import, Jinja templates) is not counted; medians are printed.
Both stages are validated side by side, as the pipeline's validate stage does (`--sequential`:
one after the other). Night 2's inputs equal night 1's, so by default its validation reuses
night 1's (`validation.reuse_unchanged`); `--no-reuse` validates it again.
Goal: validation under 10% of the crawl stage's time.
"""
from __future__ import annotations

import argparse
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


def one_round(spark, manifest: Path, threads: int, work: Path, result_format: str, reuse: bool = True,
              sequential: bool = False) -> dict[str, float]:
    from pipelines.config import load_settings
    from pipelines.crawl.stage import run_crawl
    from pipelines.config import ValidateSettings
    from pipelines.validate.stage import validate_stage, validate_stages

    warehouse = work / f"wh-{time.monotonic_ns()}"
    settings = load_settings(warehouse=warehouse.as_uri(), crawl={
        "allow_private_hosts": True, "concurrency": threads, "per_host_concurrency": threads, "retries": 1})
    times: dict[str, float] = {}
    for night, run_id in (("night1", "20261101T030000Z"), ("night2", "20261102T030000Z")):
        start = time.perf_counter()
        summary = run_crawl(settings, str(manifest), run_id, spark=spark)
        times[f"{night}_crawl"] = time.perf_counter() - start
        validation = ValidateSettings(result_format=result_format, reuse_unchanged=reuse)
        # As the pipeline's validate stage runs them: both stages side by side (validate_stages).
        start = time.perf_counter()
        if sequential:
            results = {stage: validate_stage(settings, run_id, stage, spark=spark, validation=validation)
                       for stage in ("manifest", "images")}
        else:
            results = validate_stages(settings, run_id, ["manifest", "images"], spark=spark, validation=validation)
        times[f"{night}_validate"] = time.perf_counter() - start
        for stage, result in results.items():
            times[f"{night}_{stage}"] = result.elapsed_s
            times[f"{night}_{stage}_quarantined"] = result.accounting["quarantined_rows"]
            times[f"{night}_{stage}_reused"] = bool(result.extra.get("reused_validation_of"))
            for step, seconds in result.timings_s.items():
                times[f"{night}_{stage}:{step}"] = seconds
        times[f"{night}_fetched"] = summary.fetched
        times[f"{night}_not_modified"] = summary.not_modified
    shutil.rmtree(warehouse, ignore_errors=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="2000", help="sample images to crawl, or 'all' (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="counted rounds (default 3)")
    parser.add_argument("--threads", type=int, default=16, help="fetch threads per Spark task (default 16)")
    parser.add_argument("--result-format", default="BASIC", choices=["BOOLEAN_ONLY", "BASIC", "SUMMARY"],
                        help="GX result format (validation.result_format; default BASIC)")
    parser.add_argument("--no-reuse", action="store_true",
                        help="validate night 2 again even though its inputs equal night 1's "
                             "(validation.reuse_unchanged: false)")
    parser.add_argument("--sequential", action="store_true",
                        help="validate manifest, then images (default: side by side, as the pipeline does)")
    args = parser.parse_args()
    os.environ["CATALOG_INDEX_NO_PROGRESS"] = "1"

    from pipelines.config import load_settings
    from pipelines.sample_catalog import build_sample_manifest, write_manifest_csv
    from pipelines.spark import get_spark

    size = None if args.images == "all" else int(args.images)
    work = Path(tempfile.mkdtemp(prefix="bench-validate-"))
    port = free_port()
    server = start_server(port)
    try:
        rows = build_sample_manifest(f"http://127.0.0.1:{port}", size)
        manifest = write_manifest_csv(rows, work / "manifest.csv")
        spark = get_spark(load_settings(spark={"master": "local[2]"}), "bench-validate")
        options = dict(reuse=not args.no_reuse, sequential=args.sequential)
        one_round(spark, manifest, args.threads, work, args.result_format, **options)  # warm-up, not counted
        rounds = []
        for i in range(args.repeats):
            rounds.append(one_round(spark, manifest, args.threads, work, args.result_format, **options))
            r = rounds[-1]
            print(f"round {i + 1}: " + "; ".join(
                f"{night} crawl {r[f'{night}_crawl']:.1f}s, validate {r[f'{night}_validate']:.1f}s (manifest "
                f"{r[f'{night}_manifest']:.1f}s, images {r[f'{night}_images']:.1f}s"
                + (", reused" if r[f"{night}_images_reused"] else "") + ")" for night in ("night1", "night2")), flush=True)
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    print(f"\n{len(rows)} sample images, Spark local[2], {args.threads} fetch threads per task, GX result format "
          f"{args.result_format}, {'sequential' if args.sequential else 'side by side'}, reuse "
          f"{'off' if args.no_reuse else 'on'}, {args.repeats} rounds (median seconds; manifest and images are each "
          "stage's own elapsed time, validate the wall time of both)")
    print(f"{'':34} {'crawl':>7} {'manifest':>9} {'images':>7} {'validate':>9} {'share':>7}")
    for night, label in (("night1", "night 1 (first crawl, downloads)"),
                         ("night2", "night 2 (incremental, 304s)")):
        crawl, manifest_s, images_s = median(f"{night}_crawl"), median(f"{night}_manifest"), median(f"{night}_images")
        validate = median(f"{night}_validate")
        share = statistics.median(r[f"{night}_validate"] / r[f"{night}_crawl"] for r in rounds)
        print(f"{label:34} {crawl:7.2f} {manifest_s:9.2f} {images_s:7.2f} {validate:9.2f} {share * 100:6.1f}%")
    steps = sorted({k.split(":", 1)[1] for k in rounds[0] if ":" in k})
    print(f"\nvalidation steps (median seconds; the rest is reading, gates, writing the report): {', '.join(steps)}")
    for night in ("night1", "night2"):
        for stage in ("manifest", "images"):
            print(f"  {night} {stage:9} " + "  ".join(
                f"{step} {median(f'{night}_{stage}:{step}'):.2f}" for step in steps if f"{night}_{stage}:{step}" in rounds[0]))
    r = rounds[0]
    print(f"quarantined by validation: manifest {r['night1_manifest_quarantined']}, "
          f"images {r['night1_images_quarantined']} (of {r['night1_fetched']} images); goal: share < 10%")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
