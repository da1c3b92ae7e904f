"""`catalog-index serve --workers 2` as an operator runs it: the CLI in a subprocess, uvicorn's
supervisor and two worker processes, real sockets, every request on a fresh connection.

What an operator would notice: both workers answer image and vector searches; a snapshot pulled
into the served directory is served by every worker within the refresh interval; one scrape of
/metrics counts the requests of every worker and shows the snapshot each live worker serves; a
worker killed with kill -9 costs at most the requests it held, and uvicorn starts a replacement
that serves the live snapshot; SIGTERM stops every worker within seconds and leaves no metrics
directory behind. The tests share one service and run in file order (the last one stops it).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pipelines.client import pull
from serving import OPENCLIPART, free_port, pulled_catalog

pytestmark = pytest.mark.skipif(not OPENCLIPART.is_dir(), reason="sample catalog (openclipart-png) not installed")

REPO = Path(__file__).resolve().parents[1]
CLI = "import sys; from pipelines.cli import main; sys.exit(main(sys.argv[1:]))"
WORKERS, REFRESH_S = 2, 0.5
KEY = "workers-key-0123456789abcdef"
FRESH = {"Connection": "close", "Authorization": f"Bearer {KEY}"}  # and no Session: a new connection each time


@dataclass
class Running:
    process: subprocess.Popen
    url: str
    tmp: Path        # the service's TMPDIR: where run_server makes its metrics directory
    log: Path

    def workers(self) -> set[int]:
        """Pids of the live worker processes (uvicorn spawns them: `spawn_main` in their command line)."""
        pids = set()
        for child in psutil.Process(self.process.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                    pids.add(child.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def metric(self, name: str) -> list[tuple[dict, float]]:
        """(labels, value) of every sample called `name` in one scrape of /metrics."""
        text = requests.get(self.url + "/metrics", headers=FRESH, timeout=10).text
        return [(sample.labels, sample.value) for family in text_string_to_metric_families(text)
                for sample in family.samples if sample.name == name]

    def serving(self) -> dict[int, str]:
        """pid -> snapshot id, of every worker in catalog_index_snapshot_info."""
        return {int(labels["pid"]): labels["snapshot_id"] for labels, _ in self.metric("catalog_index_snapshot_info")}

    def searches_counted(self) -> float:
        return sum(value for labels, value in self.metric("catalog_index_requests_total")
                   if labels["endpoint"] == "/v1/search")

    def tail(self) -> str:
        return self.log.read_text()[-4000:]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return pulled_catalog(tmp_path_factory.mktemp("serve-workers"))


@pytest.fixture(scope="module")
def service(catalog, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-workers-tmp")
    key_file = tmp / "api-key"
    key_file.write_text(KEY + "\n")
    # What services killed with kill -9 left: one whose parent is gone (removed at start), one whose
    # parent lives (this test process: kept).
    gone = subprocess.Popen(["true"])
    gone.wait()
    for name, pid in (("catalog-index-serve-abandoned", gone.pid), ("catalog-index-serve-running", os.getpid())):
        (tmp / name / "metrics").mkdir(parents=True)
        (tmp / name / "parent.pid").write_text(str(pid))
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}  # two workers and the test share the cores
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--snapshot-dir", str(catalog.dest),
                                    "--workers", str(WORKERS), "--port", str(port), "--refresh-s", str(REFRESH_S),
                                    "--api-key-file", str(key_file)],
                                   stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    running = Running(process, f"http://127.0.0.1:{port}", tmp, log)
    try:
        deadline = time.monotonic() + 90
        while True:  # every worker has loaded its snapshot
            assert process.poll() is None, f"serve exited ({process.returncode}):\n{running.tail()}"
            assert time.monotonic() < deadline, f"{WORKERS} workers never all served a snapshot:\n{running.tail()}"
            try:
                if len(running.serving()) == WORKERS:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                for pid in running.workers():
                    os.kill(pid, signal.SIGKILL)
                process.kill()
                process.wait(10)


def search_image(service: Running, image: tuple[str, str, Path]) -> requests.Response:
    product, _, path = image
    return requests.post(service.url + "/v1/search?k=3", files={"image": (path.name, path.read_bytes())},
                         headers=FRESH, timeout=60)


def search_vector(service: Running, vector) -> requests.Response:
    return requests.post(service.url + "/v1/search?k=3", json={"vector": [float(v) for v in vector]},
                         headers=FRESH, timeout=60)


def vector_queries(catalog) -> list[tuple[str, np.ndarray]]:
    """(product, its own vector): features are keyed by the sha256 RealCatalog gave image i."""
    return [(product, np.asarray(catalog.features[f"{i:064x}"])) for i, (product, _, _) in enumerate(catalog.images)]


def test_both_workers_answer_image_and_vector_searches(catalog, service):
    health = requests.get(service.url + "/healthz", headers=FRESH, timeout=10)
    assert health.status_code == 200 and health.json()["snapshot_id"] == catalog.first["snapshot_id"]
    workers = service.workers()
    assert len(workers) == WORKERS
    vectors = vector_queries(catalog)
    answered_by: set[int] = set()
    with ThreadPoolExecutor(4) as pool:
        for round_ in range(10):  # fresh connections land on either worker; a few rounds see both
            images = catalog.images[round_ * 4 % len(catalog.images):][:4]
            asked = [(image[0], pool.submit(search_image, service, image)) for image in images]
            asked += [(product, pool.submit(search_vector, service, vector))
                      for product, vector in vectors[round_ * 4 % len(vectors):][:4]]
            for product, future in asked:
                answer = future.result()
                assert answer.status_code == 200, answer.text[:300]
                body = answer.json()
                assert body["snapshot_id"] == catalog.first["snapshot_id"] == answer.headers["X-Snapshot-Id"]
                assert body["results"][0]["product_id"] == product and body["results"][0]["score"] > 0.99
                answered_by.add(int(answer.headers["X-Worker"]))
            if len(answered_by) == WORKERS:
                break
    assert answered_by == workers, (answered_by, workers)


def test_every_worker_serves_a_new_snapshot_within_the_refresh_interval(catalog, service):
    second = catalog.publish()
    pull(catalog.uri, catalog.dest)
    pulled = time.monotonic()
    product, vector = vector_queries(catalog)[5]
    while True:  # 30 requests in a row on fresh connections, every one answered from the new snapshot
        answers = [search_vector(service, vector) for _ in range(30)]
        if all(a.status_code == 200 and a.json()["snapshot_id"] == second["snapshot_id"] for a in answers):
            break
        assert time.monotonic() - pulled < REFRESH_S + 15, "some worker kept serving the old snapshot"
    assert all(a.json()["results"][0]["product_id"] == product for a in answers)
    assert service.serving() == {pid: second["snapshot_id"] for pid in service.workers()}


def test_one_scrape_counts_every_worker(catalog, service):
    before = service.searches_counted()
    vectors = vector_queries(catalog)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda query: search_vector(service, query[1]), vectors * 2))
    assert all(answer.status_code == 200 for answer in answers)
    assert len({answer.headers["X-Worker"] for answer in answers}) == WORKERS, "one worker answered everything"
    for _ in range(3):  # whichever worker answers the scrape
        assert service.searches_counted() - before == len(answers)
    live = service.serving()
    assert set(live) == service.workers() and len(set(live.values())) == 1
    ages = {int(labels["pid"]): value for labels, value in service.metric("catalog_index_snapshot_age_seconds")}
    assert set(ages) == set(live) and all(0 <= age < 3600 for age in ages.values())
    vectors_per_worker = service.metric("catalog_index_snapshot_vectors")
    assert sorted(value for _, value in vectors_per_worker) == [len(catalog.images)] * WORKERS


def test_a_worker_killed_with_kill_9_is_replaced_and_the_service_keeps_answering(catalog, service):
    before_counts = service.searches_counted()
    live_snapshot = set(service.serving().values()).pop()
    old = service.workers()
    victim = min(old)
    vectors = vector_queries(catalog)
    outcomes: list[tuple[float, int | None, dict, str]] = []   # (sent at, status or None, body, X-Worker)
    stop = threading.Event()

    def client(number: int) -> None:
        while not stop.is_set():
            product, vector = vectors[number % len(vectors)]
            sent = time.monotonic()
            try:
                answer = search_vector(service, vector)
                outcomes.append((sent, answer.status_code, answer.json(), answer.headers.get("X-Worker", "")))
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as error:  # cut off
                outcomes.append((sent, None, {"error": str(error)}, ""))
            number += 1

    clients = [threading.Thread(target=client, args=(n,)) for n in range(2)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(0.5)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        deadline = killed_at + 60
        while True:  # a replacement worker appears and answers searches from the live snapshot
            replacements = service.workers() - old
            answered = {int(w) for _, status, body, w in list(outcomes)
                        if status == 200 and body["snapshot_id"] == live_snapshot and w}
            if replacements and replacements & answered:
                break
            assert time.monotonic() < deadline, f"no replacement answered; workers {service.workers()}\n{service.tail()}"
            time.sleep(0.2)
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)
    assert service.process.poll() is None
    assert victim not in service.workers() and len(service.workers()) == WORKERS
    failed = [outcome for outcome in outcomes if outcome[1] != 200]
    # Only a request already in flight on the killed worker may fail: no answer, sent before the
    # kill, at most one per client.
    assert all(status is None and sent < killed_at for sent, status, _, _ in failed), failed
    assert len(failed) <= len(clients), failed
    answered = [outcome for outcome in outcomes if outcome[1] == 200]
    assert all(body["snapshot_id"] == live_snapshot for _, _, body, _ in answered)
    assert sum(1 for sent, *_ in answered if sent > killed_at) > 10  # kept answering meanwhile
    # The victim's series left /metrics; its counts did not (a killed in-flight request may be counted).
    assert service.serving() == {pid: live_snapshot for pid in service.workers()}
    counted = service.searches_counted() - before_counts
    assert len(answered) <= counted <= len(answered) + len(failed)


def test_the_api_key_is_in_no_process_environment_and_abandoned_service_directories_are_removed(service):
    processes = [psutil.Process(service.process.pid)] + [psutil.Process(pid) for pid in service.workers()]
    assert len(processes) == WORKERS + 1
    for process in processes:
        assert not any(KEY in value for value in process.environ().values()), process.pid
    [private] = [folder for folder in service.tmp.glob("catalog-index-serve-*")
                 if folder.name != "catalog-index-serve-running"]
    assert not (service.tmp / "catalog-index-serve-abandoned").exists()
    assert (service.tmp / "catalog-index-serve-running").is_dir()  # its parent lives: not ours to remove
    assert oct(private.stat().st_mode & 0o777) == "0o700"
    assert oct((private / "settings.json").stat().st_mode & 0o777) == "0o600"
    assert requests.get(service.url + "/v1/snapshot", headers={"Connection": "close"}, timeout=10).status_code == 401


def test_sigterm_stops_every_worker_and_removes_the_metrics_directory(service):
    [private] = [folder for folder in service.tmp.glob("catalog-index-serve-*")
                 if folder.name != "catalog-index-serve-running"]
    metrics_dirs = [private / "metrics"]
    assert any(metrics_dirs[0].iterdir())
    assert oct(private.stat().st_mode & 0o777) == "0o700"  # private
    workers = [psutil.Process(pid) for pid in service.workers()]
    assert len(workers) == WORKERS
    started = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(15) == 0, service.tail()
    stopped = time.monotonic() - started
    _, alive = psutil.wait_procs(workers, timeout=1)
    assert not alive and stopped < 10, (alive, stopped)
    assert not metrics_dirs[0].exists() and not private.exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(service.url + "/healthz", timeout=2)
