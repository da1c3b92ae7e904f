"""Fault injection on the snapshot protocol (invariants 4-7 of DESIGN.md), with real processes and a real
fault proxy in front of a real S3 server:

* S3 faults (503 SlowDown, connection reset, a write whose answer is lost, slow responses) at random
  requests of publish, pull and retention;
* nightly + backfill + rollback + pull + retention in concurrent processes, randomized interleavings;
* kill -9 of a publish at a random moment, then the same publish again.

After every run: LATEST verifies (manifest sha256 and every file), its manifest's base_snapshot equals
its previous_snapshot and the pointer's, no two publishes built on one base both went live, and every
published snapshot within keep_snapshots is still there.

The normal run is bounded and seeded (about a minute); CATALOG_INDEX_CHAOS=N multiplies the number of
runs by N (`make chaos`: CATALOG_INDEX_CHAOS=10 pytest -q tests/test_warehouse_faults.py).
"""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.client import SnapshotClient, SnapshotError, pull
from pipelines.config import load_settings
from pipelines.config import IndexSettings
from pipelines.index import build_index
from pipelines.layout import snapshot_prefix
from pipelines.publish import (LatestMoved, PublishError, apply_retention, holding_live_snapshot, publish_snapshot,
                               read_latest, rollback)
from pipelines.snapshot import read_manifest, verify_snapshot_files
from pipelines.storage import StorageError, open_storage
from s3_fault_proxy import FAULTS, S3FaultProxy
from synthetic_catalog import MODEL, write_catalog

CHAOS = int(os.environ.get("CATALOG_INDEX_CHAOS", "1"))
CFG = IndexSettings(max_vectors_per_shard=40, flat_max_vectors=1000, recall_queries=10)
KEEP = 2
REPO = Path(__file__).resolve().parents[1]


def check_invariants(storage, published_live: list[str]) -> dict:
    """What every fault must leave true; returns LATEST's manifest."""
    pointer = read_latest(storage, "catalog")
    assert pointer is not None
    manifest = read_manifest(storage, "catalog", pointer["snapshot_id"], pointer["manifest_sha256"])
    verify_snapshot_files(storage, snapshot_prefix("catalog", pointer["snapshot_id"]), manifest["files"])
    assert manifest.get("base_snapshot", manifest["previous_snapshot"]) == manifest["previous_snapshot"]
    if pointer.get("action") == "publish":
        assert pointer.get("previous_snapshot") == manifest["previous_snapshot"]
    present = {sid for sid in storage.list_dirs("indexes/catalog/")
               if storage.exists(snapshot_prefix("catalog", sid) + "manifest.json")}
    for snapshot_id in sorted(published_live)[-KEEP:]:
        assert snapshot_id in present, f"published snapshot {snapshot_id} within keep_snapshots={KEEP} is gone"
    return manifest


# -- S3 faults through a proxy ---------------------------------------------------------------------

@pytest.fixture
def proxied(s3_store):
    bucket, s3 = s3_store
    proxy = S3FaultProxy(s3.endpoint_url).start()
    faulty = s3.model_copy(update={"endpoint_url": proxy.endpoint, "max_attempts": 4})
    uri = f"s3://{bucket}/wh"
    direct = open_storage(uri, s3)
    write_catalog(direct, "r1", {"food": 50, "tools": 40, "toys": 30})
    yield uri, s3, faulty, proxy, direct
    proxy.stop()


@pytest.mark.s3
def test_s3_faults_during_publish_pull_and_retention_never_break_the_snapshot_protocol(proxied, tmp_path):
    uri, s3, faulty, proxy, direct = proxied
    settings = load_settings(warehouse=uri, s3=s3.model_dump())
    live = [publish_snapshot(direct, "catalog", snapshot_id=build_index(settings, "r1", model=MODEL, cfg=CFG,
                                                                          runner="local").snapshot_id).snapshot_id]
    rng = random.Random(17)
    outcomes: dict[str, int] = {}
    for round_ in range(4 * CHAOS):
        built = build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local")
        plan = {n: rng.choice(FAULTS) for n in rng.sample(range(60), 6)}
        proxy.arm(plan)
        storage = open_storage(uri, faulty)
        try:
            published = publish_snapshot(storage, "catalog", snapshot_id=built.snapshot_id, keep_snapshots=KEEP,
                                         retention_grace_hours=0)
            outcome = "published" + (" (retention failed)" if published.retention_error else "")
        except (StorageError, PublishError, LatestMoved) as exc:
            outcome = type(exc).__name__
            proxy.arm({})
            again = publish_snapshot(direct, "catalog", snapshot_id=built.snapshot_id, keep_snapshots=KEEP,
                                     retention_grace_hours=0)   # the task's retry, faults gone
            assert again.snapshot_id == built.snapshot_id
        live.append(built.snapshot_id)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        proxy.arm({n: rng.choice(FAULTS) for n in rng.sample(range(30), 4)})
        try:
            pulled = pull(uri, tmp_path / "serving", s3=faulty)
            SnapshotClient(tmp_path / "serving", verify=True)
            assert pulled.snapshot_id == built.snapshot_id
        except (StorageError, SnapshotError):
            pass  # a pull may fail; it must never leave a bad `current`
        if (tmp_path / "serving" / "current").exists():
            SnapshotClient(tmp_path / "serving", verify=True)
        proxy.arm({})
        manifest = check_invariants(direct, live)
        assert manifest["snapshot_id"] == built.snapshot_id and manifest["previous_snapshot"] == live[-2]
    kinds: dict[str, int] = {}
    for _, fault, method, _ in proxy.injected:
        kinds[f"{fault} {method}"] = kinds.get(f"{fault} {method}", 0) + 1
    print(f"\nS3 fault rounds: {4 * CHAOS}, faults injected {dict(sorted(kinds.items()))}, outcomes {outcomes}")
    assert sum(outcomes.values()) == 4 * CHAOS and kinds


@pytest.mark.s3
@pytest.mark.parametrize("fault", ["lost", "reset"] + (["slowdown", "slow"] if CHAOS > 1 else []))
@pytest.mark.parametrize("target", ["/LATEST", "/manifest.json"])
def test_a_fault_on_the_manifest_or_latest_write_still_publishes_exactly_once(proxied, fault, target):
    """The conditional write reaches the store but its answer is lost: the client retries, the store answers
    412 (the object changed: we changed it). That is our own write, not a lost race."""
    uri, s3, faulty, proxy, direct = proxied
    settings = load_settings(warehouse=uri, s3=s3.model_dump())
    first = publish_snapshot(direct, "catalog", snapshot_id=build_index(settings, "r1", model=MODEL, cfg=CFG,
                                                                          runner="local").snapshot_id).snapshot_id
    built = build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local")
    proxy.arm({}, [("PUT", target, fault)])
    try:
        published = publish_snapshot(open_storage(uri, faulty), "catalog", snapshot_id=built.snapshot_id)
    except PublishError:
        # the manifest's create-once write was answered 412 after a lost answer: the retry completes it
        assert target == "/manifest.json" and fault == "lost"
        published = publish_snapshot(open_storage(uri, faulty), "catalog", snapshot_id=built.snapshot_id)
    assert [f for _, f, _, _ in proxy.injected] == [fault]
    assert published.snapshot_id == built.snapshot_id and published.previous_snapshot == first
    check_invariants(direct, [first, built.snapshot_id])


# -- concurrent nightly + backfill + rollback + pull + retention ---------------------------------------

def _actor(role: str, uri: str, seed: int, first: str, queue) -> None:
    rng = random.Random(seed * 31 + hash(role) % 1000)
    storage = open_storage(uri)
    settings = load_settings(warehouse=uri)
    try:
        time.sleep(rng.uniform(0, 0.3))
        if role in ("nightly", "backfill"):
            with holding_live_snapshot(storage, "catalog"):   # as pipeline.run_stage and the CLI build it
                built = build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local",
                                    categories=["food"] if role == "backfill" else None)
            time.sleep(rng.uniform(0, 0.3))
            result = publish_snapshot(storage, "catalog", snapshot_id=built.snapshot_id, keep_snapshots=KEEP,
                                      retention_grace_hours=1)
            queue.put((role, "published", built.snapshot_id, result.previous_snapshot))
        elif role == "rollback":
            rollback(storage, "catalog", first)
            queue.put((role, "rolled back", first, None))
        elif role == "retention":
            queue.put((role, "retired", ",".join(apply_retention(storage, "catalog", KEEP, grace_hours=1)), None))
        elif role == "pull":
            dest = Path(uri.removeprefix("file://")).parent / f"serving-{seed}"
            for _ in range(3):
                try:
                    pulled = pull(uri, dest)
                except SnapshotError as exc:   # retired between resolving LATEST and downloading: pull again
                    queue.put((role, "retry", str(exc)[:60], None))
                    continue
                client = SnapshotClient(dest, verify=True)
                assert client.snapshot_id == pulled.snapshot_id
                queue.put((role, "pulled", pulled.snapshot_id, None))
                time.sleep(rng.uniform(0, 0.2))
    except (LatestMoved, PublishError) as exc:
        queue.put((role, type(exc).__name__, str(exc)[:120], None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as a failure
        queue.put((role, "ERROR", f"{type(exc).__name__}: {exc}", None))


def test_concurrent_nightly_backfill_rollback_pull_and_retention_interleavings(tmp_path):
    runs = 20 * CHAOS
    # Not fork: a child forked from this process (faiss's OpenMP threads already started) can deadlock.
    # A fork server that imported the pipeline before any thread started forks clean children quickly.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["pipelines.publish", "pipelines.client", "pipelines.index.stage",
                                    "synthetic_catalog", "test_warehouse_faults"])
    tally: dict[str, int] = {}
    for seed in range(runs):
        uri = (tmp_path / f"wh{seed}" / "warehouse").as_uri()
        storage = open_storage(uri)
        write_catalog(storage, "r1", {"food": 40, "tools": 30})
        settings = load_settings(warehouse=uri)
        first = publish_snapshot(storage, "catalog", snapshot_id=build_index(
            settings, "r1", model=MODEL, cfg=CFG, runner="local").snapshot_id).snapshot_id
        second = publish_snapshot(storage, "catalog", snapshot_id=build_index(
            settings, "r1", model=MODEL, cfg=CFG, runner="local").snapshot_id).snapshot_id
        queue = context.Queue()
        roles = ["nightly", "backfill", "rollback", "pull", "retention"]
        random.Random(seed).shuffle(roles)
        procs = [context.Process(target=_actor, args=(role, uri, seed, first, queue)) for role in roles]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(120)
        results = []
        while not queue.empty():
            results.append(queue.get())
        # A build younger than the grace period is never retired under its publish (invariant 5).
        errors = [r for r in results if r[1] == "ERROR" or "was never built" in r[2]]
        assert not errors, (seed, {"first": first, "second": second}, results)
        publishes = [r for r in results if r[1] == "published"]
        # nightly and backfill both built on `second` (or on whatever a racing rollback made live): both may
        # go live only if one was built on the other's snapshot, never both from one base.
        bases = [previous for _, _, _, previous in publishes]
        assert len(bases) == len(set(bases)), (seed, results)
        live = [first, second] + [sid for _, _, sid, _ in publishes]
        check_invariants(storage, [s for s in live if storage.exists(snapshot_prefix("catalog", s) + "manifest.json")]
                         or live)
        for role, outcome, detail, _ in results:
            key = f"{role}:{outcome}" + (f" ({detail[:45]})" if outcome == "PublishError" else "")
            tally[key] = tally.get(key, 0) + 1
    print(f"\n{runs} interleavings: {dict(sorted(tally.items()))}")
    assert tally.get("nightly:LatestMoved", 0) + tally.get("backfill:LatestMoved", 0) > 0  # races did happen


# -- kill -9 ------------------------------------------------------------------------------------------

PUBLISH = """
import sys
from pipelines.publish import publish_snapshot
from pipelines.storage import open_storage
import time
print("READY", flush=True)
sys.stdin.readline()
started = time.monotonic()
publish_snapshot(open_storage(sys.argv[1]), "catalog", snapshot_id=sys.argv[2], keep_snapshots=2,
                 retention_grace_hours=0)
print("DONE", time.monotonic() - started)
"""


def test_publish_killed_at_random_moments_then_rerun_converges(tmp_path):
    uri = (tmp_path / "warehouse").as_uri()
    storage = open_storage(uri)
    write_catalog(storage, "r1", {"food": 80, "tools": 60, "toys": 40})
    settings = load_settings(warehouse=uri)
    live = [publish_snapshot(storage, "catalog", snapshot_id=build_index(
        settings, "r1", model=MODEL, cfg=CFG, runner="local").snapshot_id).snapshot_id]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    rng = random.Random(5)
    killed, duration = 0, 0.05
    for _ in range(6 * CHAOS):
        built = build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local")
        proc = subprocess.Popen([sys.executable, "-c", PUBLISH, uri, built.snapshot_id], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline().strip() == "READY"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        time.sleep(rng.uniform(0, duration))   # somewhere in the publish: verify, manifest, LATEST, retention
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
        pointer = read_latest(storage, "catalog")
        assert pointer["snapshot_id"] in (live[-1], built.snapshot_id)   # the old one or the new one, nothing else
        check_invariants(storage, live + ([built.snapshot_id] if pointer["snapshot_id"] == built.snapshot_id else []))
        rerun = subprocess.run([sys.executable, "-c", PUBLISH, uri, built.snapshot_id], env=env, input="go\n",
                               capture_output=True, text=True, timeout=120)
        assert "DONE" in rerun.stdout, rerun.stderr[-2000:]
        duration = max(duration, float(rerun.stdout.split()[-1]))   # how long one publish takes here
        live.append(built.snapshot_id)
        manifest = check_invariants(storage, live)
        assert manifest["snapshot_id"] == built.snapshot_id and manifest["previous_snapshot"] == live[-2]
    print(f"\npublish killed {killed} of {6 * CHAOS} times")
