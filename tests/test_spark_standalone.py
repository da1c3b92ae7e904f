"""The stage jobs on a real Spark standalone cluster, not only on local[*].

A master and one small worker (1 core) run on 127.0.0.1, started with pyspark's own
`spark-class`; every stage is its own `spark-submit --master spark://127.0.0.1:P jobs/<stage>.py`,
as the DAGs run them with a Spark connection. The driver runs in another directory than the
worker, and the worker (so every executor) gets none of the driver's CATALOG_INDEX_* settings and
another HOME: a stage that relied on state in a driver's memory, on the previous stage's process,
or on a session it started itself (local[*]) would fail here or leave no application on the master.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUN_ID = "20261123T020000Z"
# Small, quick-starting JVMs: the jobs are short and the machine may be small.
JVM_OPTIONS = "-XX:+UseSerialGC -XX:TieredStopAtLevel=1"
# Passed to spark-submit only: the executors' launch commands must carry it (the jobs keep spark-submit's settings).
SUBMIT_MARKER = "-Dcatalog.index.submitted=true"


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


pytestmark = [
    pytest.mark.spark,
    pytest.mark.slow,
    pytest.mark.skipif(_java() is None, reason="no Java runtime: the Spark standalone master and worker need one "
                                                "(`make setup` installs it)"),
]


def _spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _master_state(webui: str) -> dict:
    with urllib.request.urlopen(f"{webui}/json/", timeout=5) as response:
        return json.load(response)


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process we started in its own session, with everything it started (executors, Python workers)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            os.killpg(proc.pid, 0)  # anything left in the group?
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.port, self.webui_port = _free_port(), _free_port()
        self.master_url = f"spark://127.0.0.1:{self.port}"
        self.webui = f"http://127.0.0.1:{self.webui_port}"
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("wb")
        proc = subprocess.Popen([str(_spark_home() / "bin" / "spark-class"), *args], stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def wait_for(self, what: str, ready, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    pytest.fail(f"Spark {what}: a cluster process exited ({proc.args[1]})\n"
                                f"{self.log_tail('master')}\n{self.log_tail('worker')}")
            try:
                state = _master_state(self.webui)
                if ready(state):
                    return state
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"Spark {what} within {timeout:.0f}s\n{self.log_tail('master')}\n{self.log_tail('worker')}")


@pytest.fixture(scope="module")
def standalone_cluster(tmp_path_factory):
    """A Spark standalone master and one worker (1 core, 2 GB) on 127.0.0.1; always torn down."""
    root = tmp_path_factory.mktemp("spark-standalone")
    for name in ("work", "local", "worker-home"):
        (root / name).mkdir()
    cluster = Cluster(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CATALOG_INDEX_", "PYSPARK_", "SPARK_"))}
    env.update({"SPARK_HOME": str(_spark_home()), "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_DAEMON_MEMORY": "512m",
                "SPARK_DAEMON_JAVA_OPTS": JVM_OPTIONS, "SPARK_LOCAL_DIRS": str(root / "local"),
                "HOME": str(root / "worker-home")})
    try:
        cluster.start("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                 "--port", str(cluster.port), "--webui-port", str(cluster.webui_port)], env)
        cluster.wait_for("master did not come up", lambda s: s.get("status") == "ALIVE")
        cluster.start("worker", ["org.apache.spark.deploy.worker.Worker", cluster.master_url, "--host", "127.0.0.1",
                                 "--cores", "1", "--memory", "2g", "--webui-port", str(_free_port()),
                                 "--work-dir", str(root / "work")], env)
        cluster.wait_for("worker did not register", lambda s: s.get("aliveworkers") == 1)
        yield cluster
    finally:
        for proc in reversed(cluster.procs):
            _stop(proc)


def spark_submit(cluster: Cluster, job: str, argv: list[str], cwd: Path, timeout: float = 420):
    """`spark-submit --master spark://… jobs/<job>.py ARGV`, in its own process group; (exit code, output)."""
    command = [str(_spark_home() / "bin" / "spark-submit"), "--master", cluster.master_url,
               "--properties-file", str(REPO / "infra" / "spark" / "cluster.conf"),
               "--driver-memory", "1g", "--executor-memory", "1g", "--conf", "spark.ui.enabled=false",
               "--driver-java-options", JVM_OPTIONS, "--conf", f"spark.executor.extraJavaOptions={JVM_OPTIONS} {SUBMIT_MARKER}",
               str(REPO / "jobs" / f"{job}.py"), *argv]
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "CATALOG_INDEX_NO_PROGRESS": "1"}
    env.pop("SPARK_HOME", None)
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        output, _ = proc.communicate()
        return None, output
    return proc.returncode, output


def test_stage_jobs_run_on_a_standalone_cluster(standalone_cluster, tmp_path):
    from pipelines.dedup.stage import read_dedup_images
    from pipelines.publish import read_latest, read_manifest
    from pipelines.sample_catalog import ImageServer, build_sample_manifest, write_manifest_csv
    from pipelines.storage import open_storage

    driver_dir = tmp_path / "driver"  # not the repo, not the worker's directory
    driver_dir.mkdir()
    warehouse = (tmp_path / "warehouse").as_uri()
    common = ["--warehouse", warehouse, "--run-id", RUN_ID]
    with ImageServer() as server:
        rows = build_sample_manifest(server.base_url, 30)
        manifest = write_manifest_csv(rows, tmp_path / "manifest.csv")
        stages = [("crawl", "crawl", ["--manifest", str(manifest), "--allow-private-hosts"]),
                  ("dedup", "dedup", []),
                  ("validate", "validate", ["--stage", "manifest", "images"]),
                  ("embed", "embed", []),
                  ("build_index", "build_index", []),
                  ("validate_index", "validate", ["--stage", "embeddings", "index"]),
                  ("publish", "publish", [])]
        for stage, job, extra in stages:
            started = time.monotonic()
            code, output = spark_submit(standalone_cluster, job, [*common, *extra], driver_dir)
            print(f"spark-submit jobs/{job}.py ({stage}): exit {code} after {time.monotonic() - started:.0f}s")
            assert code == 0, f"spark-submit jobs/{job}.py ({stage}) exited {code}:\n{output[-6000:]}"

    # The user's view: a published snapshot that LATEST resolves to, one vector per canonical image.
    storage = open_storage(warehouse)
    latest = read_latest(storage, "catalog")
    snapshot = read_manifest(storage, "catalog", latest["snapshot_id"], latest.get("manifest_sha256"))
    dedup = read_dedup_images(storage, RUN_ID)
    assert snapshot["source_run_id"] == RUN_ID
    assert snapshot["totals"]["shards"] == 1  # 30 images: one shard, each canonical image in it once
    assert snapshot["totals"]["vectors"] == dedup["canonical_sha256"].nunique() > 0
    assert snapshot["totals"]["missing_embeddings"] == 0
    # Every manifest row is a product in the index (duplicates point at their canonical image).
    assert len(dedup) == len(rows)
    assert snapshot["totals"]["products"] == len({(r["category"], r["product_id"]) for r in rows})
    for entry in snapshot["files"]:  # every shard file the executors wrote is there, as recorded
        data = storage.read_bytes(entry["key"])
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert storage.exists(f"reports/{RUN_ID}/report.html")  # the publish job writes the run report

    # The master's view: every Spark stage was an application on this cluster, and it finished.
    state = _master_state(standalone_cluster.webui)
    assert state["activeapps"] == []
    apps = {app["name"]: app for app in state["completedapps"]}
    for command in ("crawl", "dedup", "validate", "embed", "build-index"):
        ran = [app for name, app in apps.items() if name.startswith(f"catalog-index {command} ")
               or name == f"catalog-index {command}"]
        assert ran, f"no application for {command} on the master; completed: {sorted(apps)}"
        assert all(app["state"] == "FINISHED" and app["cores"] >= 1 for app in ran)
    # The worker's view: it launched the executors of every application, with spark-submit's settings.
    for app in state["completedapps"]:
        executors = [d for d in (standalone_cluster.root / "work" / app["id"]).iterdir() if d.is_dir()]
        assert executors, f"the worker launched no executor for {app['name']}"
        for executor in executors:
            launch = (executor / "stderr").read_text(errors="replace").split("\n", 1)[0]
            assert launch.startswith("Spark Executor Command") and SUBMIT_MARKER in launch, (app["name"], launch[:300])
