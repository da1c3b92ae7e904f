"""bench/serve: `catalog-index serve` vs the minimal server a serving team would otherwise write
(bench/serve/minimal_server.py: FastAPI + the same model + one IndexFlatIP, no verification, no merge).

    .venv/bin/python bench/serve/run.py --per-category 6 --seconds 5 --rounds 5 --vectors 1000000 --dim 1280

Side by side, one script: image-query p50/p99 and queries/s at 1, 4 and 16 concurrent clients
(multipart upload of sample-catalog PNGs over real HTTP); vector-query p50/p99 on a synthetic
snapshot of --vectors vectors built by the real build code; that snapshot's open time with and
without mmap; a hot swap under load (publish + pull + reload while 4 clients search: failed
requests counted). Numbers, not pass/fail. Goals (issue): image p99 < 250 ms at 1 client, throughput
within 10% of the minimal server, vector p99 < 10 ms and open < 1 s at 1M vectors.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from pipelines.client import SnapshotClient, pull  # noqa: E402
from serving import RealCatalog, free_port  # noqa: E402  (the tests' real-model catalog builder)


CLI = "import sys\nfrom pipelines.cli import main\nsys.exit(main(sys.argv[1:]))"


def start(argv: list[str], url: str, ready: str) -> subprocess.Popen:
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(url + ready, timeout=2).status_code in (200, 405):
                return process
        except requests.ConnectionError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{argv} did not start")


def load(url: str, payloads: list[bytes], clients: int, seconds: float, field: str = "image") -> dict:
    latencies, failures, stop = [], [0], time.monotonic() + seconds

    def client(number: int) -> None:
        session = requests.Session()
        while time.monotonic() < stop:
            data = payloads[number % len(payloads)]
            started = time.perf_counter()
            answer = session.post(url, files={field: ("q.png", data)}, timeout=60)
            latencies.append((time.perf_counter() - started) * 1000)
            failures[0] += answer.status_code != 200
            number += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    p50, p99 = np.percentile(latencies, [50, 99])
    return {"p50": p50, "p99": p99, "qps": len(latencies) / elapsed, "n": len(latencies), "failed": failures[0]}


def median_of(runs: list[dict]) -> dict:
    """Per figure, the median over rounds (failures: the sum)."""
    return {**{key: statistics.median(run[key] for run in runs) for key in ("p50", "p99", "qps", "n")},
            "failed": sum(run["failed"] for run in runs)}


def synthetic_snapshot(work: Path, vectors: int, dim: int) -> Path:
    """A pulled snapshot of `vectors` clustered vectors (bench/index's generator) built by build_index,
    kept in `work` (git-ignored) by size, so a rerun measures it again without rebuilding. The vectors
    are generated and written 100,000 at a time: 1M x 1280 never sits in RAM twice."""
    import importlib.util

    import pyarrow as pa

    serving = work / f"n{vectors}-d{dim}" / "serving"
    if (serving / "current").exists():
        print(f"reusing {serving} (delete it to rebuild)")
        return serving
    spec = importlib.util.spec_from_file_location("bench_index_run", REPO / "bench" / "index" / "run.py")
    generator = importlib.util.module_from_spec(spec)
    sys.modules["bench_index_run"] = generator  # dataclasses look their module up there
    spec.loader.exec_module(generator)  # bench/index's generator: the same synthetic set
    from pipelines.config import IndexSettings, load_settings
    from pipelines.index import build_index
    from pipelines.layout import dedup_images_key, embeddings_prefix
    from pipelines.publish import publish_snapshot
    from pipelines.storage import open_storage
    from schemas.tables import DEDUP_IMAGES, EMBEDDINGS

    root = work / f"n{vectors}-d{dim}"
    uri = (root / "warehouse").as_uri()
    storage = open_storage(uri)
    structure, rng = generator.cluster_structure(0, 200, dim), np.random.default_rng(1)
    version, chunk = "bench-synthetic-v1", 100_000
    embedding_fields = pa.schema([EMBEDDINGS.field(name) for name in ("sha256", "vector", "model_version", "run_id")])
    categories: list[str] = []
    for part, start in enumerate(range(0, vectors, chunk)):
        stop = min(vectors, start + chunk)
        points, labels = generator.clustered_points(structure, rng, stop - start)
        categories += [f"c{label % 20}" for label in labels]
        flat = pa.array(points.reshape(-1), type=pa.float32())
        storage.write_table(f"{embeddings_prefix(version)}part-{part:05d}.parquet", pa.table({
            "sha256": [f"{i:064x}" for i in range(start, stop)],
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim).cast(pa.list_(pa.float32())),
            "model_version": [version] * (stop - start), "run_id": ["r1"] * (stop - start)}).cast(embedding_fields))
        print(f"  vectors {stop:,}/{vectors:,}", flush=True)
    shas = [f"{i:064x}" for i in range(vectors)]
    columns = {"product_id": [f"p{i}" for i in range(vectors)], "category": categories,
               "image_url": [f"http://img/{i}.png" for i in range(vectors)], "title": pa.nulls(vectors, pa.string()),
               "sha256": shas, "cluster_id": shas, "canonical_sha256": shas, "is_canonical": [True] * vectors,
               "duplicate_kind": ["none"] * vectors, "run_id": ["r1"] * vectors}
    storage.write_table(dedup_images_key("r1"), pa.table(columns).select(
        [f.name for f in DEDUP_IMAGES if f.name in columns]))
    del columns, shas, categories
    model = {"name": "unknown", "version": version, "weights_sha256": None, "preprocessing": None, "dim": dim}
    started = time.perf_counter()
    built = build_index(load_settings(warehouse=uri), "r1", model=model, runner="local",
                        cfg=IndexSettings(recall_queries=200))
    print(f"  build_index {time.perf_counter() - started:.0f}s", flush=True)
    publish_snapshot(storage, "catalog", snapshot_id=built.snapshot_id)
    pull(uri, serving)
    return serving


def measure_synthetic(args, python: str, work: Path) -> None:
    print(f"\nsynthetic snapshot: {args.vectors:,} x {args.dim} vectors (bench/index generator)", flush=True)
    started = time.perf_counter()
    synthetic = synthetic_snapshot(work, args.vectors, args.dim)
    print(f"ready in {time.perf_counter() - started:.0f}s")
    # open time with a cold page cache is what a host meets after a pull; dropping the cache needs
    # root, so both are measured warm (files read once first) and said so
    for path in synthetic.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                while handle.read(1 << 24):
                    pass
    opens = {}
    for mmap in (False, True):
        times = []
        for _ in range(3):
            started = time.perf_counter()
            client = SnapshotClient(synthetic, mmap=mmap)
            times.append(time.perf_counter() - started)
            del client
        opens[mmap] = statistics.median(times)
    client = SnapshotClient(synthetic, mmap=True)
    kinds = ", ".join(f"{s.shard_id} {s.entry['faiss_factory']} {s.params}" for s in client.shards)
    print(f"open (median of 3, page cache warm): in RAM {opens[False]:.3f}s, mmap {opens[True]:.3f}s  [{kinds}]")
    del client
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start([python, "-c", CLI, "serve", "--snapshot-dir", str(synthetic), "--port", str(port),
                    "--refresh-s", "3600"], url, "/healthz")
    try:
        rng = np.random.default_rng(5)
        queries = rng.standard_normal((args.vector_queries + 20, args.dim)).astype(np.float32)
        bodies = [json.dumps({"vector": query.tolist()}).encode() for query in queries]  # encoded untimed
        session, latencies, server_ms = requests.Session(), [], []
        for number, body in enumerate(bodies):
            started = time.perf_counter()
            answer = session.post(url + "/v1/search?k=10", data=body, timeout=30,
                                  headers={"Content-Type": "application/json"})
            elapsed = (time.perf_counter() - started) * 1000
            assert answer.status_code == 200, answer.text
            if number >= 20:  # the first queries fault the mapped pages in: reported apart
                latencies.append(elapsed)
                server_ms.append(answer.json()["took_ms"])
        p50, p99 = np.percentile(latencies, [50, 99])
        s50, s99 = np.percentile(server_ms, [50, 99])
        print(f"vector queries over HTTP (1 client, {len(latencies)} queries after 20 warm-up): "
              f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (server's took_ms p50 {s50:.2f}, p99 {s99:.2f})")
    finally:
        server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-category", type=int, default=8, help="sample images per category in the image snapshot")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of load per measurement")
    parser.add_argument("--vectors", type=int, default=1_000_000, help="vectors of the synthetic snapshot")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per concurrency (medians reported)")
    parser.add_argument("--vector-queries", type=int, default=500, help="vector queries timed on the synthetic snapshot")
    parser.add_argument("--only", choices=["images", "vectors"], help="run one half: image queries + hot swap, "
                        "or the synthetic snapshot's open time and vector queries")
    parser.add_argument("--work", default=str(Path(__file__).resolve().parent / "work"),
                        help="where the synthetic snapshot is kept between runs (git-ignored)")
    args = parser.parse_args()
    python = sys.executable
    if args.only != "vectors":
        measure_images(args, python)
    if args.only != "images":
        measure_synthetic(args, python, Path(args.work))


def measure_images(args, python: str) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    catalog = RealCatalog(root, per_category=args.per_category)
    catalog.publish()
    dest = root / "serving"
    pull(catalog.uri, dest)
    payloads = [path.read_bytes() for _, _, path in catalog.images]
    print(f"image snapshot: {len(payloads)} sample images; queries are those images (multipart upload)")

    ours_port, minimal_port = free_port(), free_port()
    ours_url, minimal_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{minimal_port}"
    ours = start([python, "-c", CLI, "serve", "--snapshot-dir", str(dest), "--port", str(ours_port),
                  "--refresh-s", "3600"], ours_url, "/readyz")
    rows = []
    try:
        minimal = start([python, str(REPO / "bench/serve/minimal_server.py"), str((dest / "current").resolve()),
                         str(minimal_port)], minimal_url, "/search")
        try:
            for clients in args.concurrency:
                mine, theirs = [], []
                for _ in range(args.rounds):  # alternated, so a busy spell of the machine hits both
                    mine.append(load(ours_url + "/v1/search?k=10", payloads, clients, args.seconds))
                    theirs.append(load(minimal_url + "/search?k=10", payloads, clients, args.seconds))
                rows.append((clients, median_of(mine), median_of(theirs)))
        finally:
            minimal.terminate()
        print(f"\nimage queries (ms; queries/s; medians of {args.rounds} alternated rounds of {args.seconds:g}s), "
              "this service vs the minimal server")
        print(f"{'clients':>7} | {'p50':>7} {'p99':>7} {'q/s':>6} {'fail':>4} | {'p50':>7} {'p99':>7} {'q/s':>6} | q/s ratio")
        for clients, mine, theirs in rows:
            print(f"{clients:>7} | {mine['p50']:7.1f} {mine['p99']:7.1f} {mine['qps']:6.1f} {mine['failed']:4d} | "
                  f"{theirs['p50']:7.1f} {theirs['p99']:7.1f} {theirs['qps']:6.1f} | {mine['qps'] / theirs['qps']:.2f}")

        # hot swap under load: 4 clients search while a new snapshot is published, pulled and swapped in
        result: dict = {}
        loader = threading.Thread(target=lambda: result.update(load(ours_url + "/v1/search?k=10", payloads, 4,
                                                                    args.seconds)))
        loader.start()
        time.sleep(args.seconds / 4)
        new_id = catalog.publish()["snapshot_id"]
        pull(catalog.uri, dest)
        swapped = requests.post(ours_url + "/v1/reload", timeout=120).json()
        loader.join()
        print(f"\nhot swap under load (4 clients, {args.seconds:g}s): reload {swapped['outcome']} -> "
              f"{swapped['serving'] == new_id and new_id}; {result['n']} requests, {result['failed']} failed, "
              f"p99 {result['p99']:.1f} ms")
    finally:
        ours.terminate()



if __name__ == "__main__":
    main()
