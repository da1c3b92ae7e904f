"""kill -9 of `catalog-index run` inside each stage, then the same command with the same run id: the
warehouse ends with the same content as an uninterrupted run of the same manifest (DESIGN.md 1, 4, 7).

A real catalog (sample images served over HTTP on 127.0.0.1, one URL that answers 404, one exact
duplicate), `catalog-index run --runner local` as a real process group (its Spark JVM for the
validate stages included), killed with SIGKILL at a seeded random moment inside a chosen stage, then
rerun with the same run id; in the normal run one chain in one warehouse: killed in crawl, rerun and
killed in dedup, ... killed in publish, rerun to completion. Compared with an uninterrupted run into a
fresh warehouse, by content (snapshot ids, timestamps and file names may differ): crawl state rows
(product, url, status, sha256), quarantine rows, dedup clusters and canonicals, the embedded sha256s,
the (product, category, sha256) rows of the snapshot LATEST names (pulled and verified as a serving
team would), every manifest row accounted for exactly once.

The child is the CLI's `main` behind a wrapper that prints a line when each stage starts and ends
(so the kill lands inside the stage it aims at) and sleeps a few ms per warehouse write (so the
short stages, build-index and publish, last long enough to be hit between and inside writes).
CATALOG_INDEX_CHAOS=N runs N chains, each with its own seed and a shuffled share of kill points.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines import layout
from pipelines.client import pull
from pipelines.readers import read_crawl_state, read_dedup_images, read_embeddings
from pipelines.sample_catalog import ImageServer, build_sample_manifest, write_manifest_csv
from pipelines.search import OpenSnapshot
from pipelines.storage import open_storage

pytestmark = [pytest.mark.spark, pytest.mark.slow]

CHAOS = int(os.environ.get("CATALOG_INDEX_CHAOS", "1"))
REPO = Path(__file__).resolve().parent.parent
RUN_ID = "20261120T020000Z"
KILL_STAGES = ["crawl", "dedup", "validate", "embed", "build_index", "validate_index", "publish"]
NORMAL_CHAIN = ["crawl", "dedup", "validate", "embed", "build_index", "publish"]   # validate_index: chaos chains
CONFIG = """
crawl: {rows_per_task: 8, retries: 0}
dedup: {images_per_task: 10}
embed: {images_per_task: 12, batch_size: 8}
"""

CHILD = r"""
import os, sys, time
from pipelines import pipeline
from pipelines.storage import LocalStorage

pause = float(os.environ["KILL_TEST_WRITE_PAUSE_S"])
for name in ("write_bytes", "write_if", "upload_file", "delete"):
    def slowed(self, *args, _original=getattr(LocalStorage, name), **kwargs):
        time.sleep(pause)
        return _original(self, *args, **kwargs)
    setattr(LocalStorage, name, slowed)
for stage, function in list(pipeline.STAGE_FUNCTIONS.items()):
    def marked(ctx, _stage=stage, _function=function):
        print(f"@@start {_stage}", flush=True)
        result = _function(ctx)
        print(f"@@end {_stage}", flush=True)
        return result
    pipeline.STAGE_FUNCTIONS[stage] = marked
from pipelines.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Run:
    """`catalog-index run` in its own process group; lines of its output with their arrival times."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               "KILL_TEST_WRITE_PAUSE_S": "0.01", "CATALOG_INDEX_NO_PROGRESS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[tuple[float, str]] = []
        self.ended = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.rstrip("\n")))
        self.lines.put(None)

    def wait_for(self, marker: str, timeout: float = 300) -> float | None:
        """Arrival time of the line `marker`; None if the run ended first."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if item is None:
                self.ended = True
                return None
            self.seen.append(item)
            if item[1] == marker:
                return item[0]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)   # the driver and its Spark JVM, as a lost node
        self.proc.wait()
        self.drain()

    def drain(self) -> list[str]:
        while not self.ended:
            item = self.lines.get(timeout=60)
            if item is None:
                self.ended = True
            else:
                self.seen.append(item)
        return [line for _, line in self.seen]

    def finish(self, timeout: float = 300) -> list[str]:
        self.proc.wait(timeout)
        lines = self.drain()
        assert self.proc.returncode == 0, "\n".join(lines[-60:])
        return lines


def _args(manifest: Path, warehouse: Path, config: Path) -> list[str]:
    return ["run", "--manifest", str(manifest), "--warehouse", warehouse.as_uri(), "--run-id", RUN_ID,
            "--allow-private-hosts", "--runner", "local", "--config", str(config)]


def outputs(warehouse: Path, manifest_rows: list[dict], dest: Path) -> dict:
    """The content of a finished run, by value; checks the invariants every finished run keeps."""
    storage = open_storage(warehouse.as_uri())
    state = read_crawl_state(storage, RUN_ID)
    rows = sorted(zip(state.product_id, state.category, state.image_url, state.status, state.sha256))
    quarantined = []
    for stage in ("crawl", "dedup", "embed", "validate"):
        prefix = layout.quarantine_prefix(RUN_ID, stage)
        if storage.list(prefix):
            table = storage.read_table(prefix).to_pandas()
            quarantined += [(stage, *r) for r in zip(table.product_id, table.image_url, table.reason)]
    # 1. every manifest row in exactly one place: a state row or a crawl quarantine row, once
    keys = [(p, u) for p, _, u, _, _ in rows] + [(p, u) for stage, p, u, _ in quarantined if stage == "crawl"]
    assert sorted(keys) == sorted((r["product_id"], r["image_url"]) for r in manifest_rows)
    report = json.loads(storage.read_text(f"{layout.reports_prefix(RUN_ID)}report.json"))
    assert report["crawl"]["accounted"] == report["crawl"]["manifest_rows"] == len(manifest_rows)
    dedup = read_dedup_images(storage, RUN_ID)
    clusters = sorted(zip(dedup.product_id, dedup.image_url, dedup.sha256, dedup.cluster_id, dedup.canonical_sha256,
                          dedup.is_canonical, dedup.duplicate_kind))
    # 4. LATEST names a complete snapshot: pulled and verified file by file, then opened with its checksums
    pulled = pull(warehouse.as_uri(), dest)
    snapshot = OpenSnapshot(pulled.path, verify=True)
    indexed = sorted(row for shard in snapshot.shards for row in zip(
        shard.columns["product_id"].to_pylist(), shard.columns["category"].to_pylist(),
        shard.columns["sha256"].to_pylist()))
    assert len(indexed) == len(set(indexed))
    embedded = set(read_embeddings(storage, snapshot.model_version, columns=["sha256"]).sha256)
    # every canonical image is embedded and every live (product, image) is searchable in its category
    assert set(dedup.canonical_sha256) <= embedded
    assert {(p, c) for p, c, *_ in rows} == {(p, c) for p, c, _ in indexed}
    return {"state": rows, "quarantine": sorted(quarantined), "dedup": clusters, "embedded": sorted(embedded),
            "indexed": indexed, "snapshot_source": snapshot.manifest["source_run_id"],
            "totals": snapshot.manifest["totals"]}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-resume")
    with ImageServer() as server:
        rows = build_sample_manifest(server.base_url, 36)
        rows.append({**rows[0], "product_id": rows[0]["product_id"] + "-twin"})          # the same image twice
        rows.append({**rows[1], "product_id": "gone", "image_url": server.base_url.rstrip("/") + "/no/such.png"})
        manifest = write_manifest_csv(rows, root / "manifest.csv")
        config = root / "settings.yaml"
        config.write_text(CONFIG)
        # the uninterrupted run, into its own warehouse; stage durations as seen from here
        run = Run(_args(manifest, root / "baseline", config))
        durations = {}
        for stage in KILL_STAGES:
            started = run.wait_for(f"@@start {stage}")
            durations[stage] = run.wait_for(f"@@end {stage}") - started
        run.finish()
        yield root, manifest, config, rows, durations, outputs(root / "baseline", rows, root / "pull-baseline")


@pytest.mark.parametrize("chain", range(CHAOS))
def test_a_run_killed_inside_every_stage_then_rerun_ends_as_an_uninterrupted_run(catalog, chain):
    root, manifest, config, rows, durations, expected = catalog
    rng = random.Random(1000 + chain)
    stages = list(NORMAL_CHAIN) if chain == 0 else rng.sample(KILL_STAGES, rng.randint(2, len(KILL_STAGES)))
    stages.sort(key=KILL_STAGES.index)
    warehouse = root / f"killed-{chain}"
    landed = []
    for stage in stages:
        fraction = rng.random()
        for attempt in range(5):   # a kill that came after the stage's end is tried again, earlier
            run = Run(_args(manifest, warehouse, config))
            started = run.wait_for(f"@@start {stage}")
            assert started is not None, f"{stage}: " + "\n".join(run.drain()[-60:])
            time.sleep(fraction * 0.9 * durations[stage] / (3 ** attempt))
            run.kill()
            if f"@@end {stage}" not in [line for _, line in run.seen]:
                landed.append((stage, round(time.monotonic() - started, 3)))
                break
        else:
            pytest.fail(f"no kill landed inside {stage} in 5 tries")
    Run(_args(manifest, warehouse, config)).finish()
    print(f"\nchain {chain}: killed inside {landed}; stage durations {durations}")
    got = outputs(warehouse, rows, root / f"pull-{chain}")
    for key in expected:
        assert got[key] == expected[key], key
