"""The light install for serving hosts: `requirements-serve.txt` (= `pip install .[serve]`) has no
Airflow, Spark, Great Expectations or petastorm, pins what requirements.txt pins, and is enough:
the serving path runs in processes where those packages cannot be imported (an import hook
refuses them), and every pinned package it loads is in the serving list."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from serving import OPENCLIPART, RealCatalog, free_port

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("apache-airflow", "pyspark", "great-expectations", "petastorm")
# Loaded only because they happen to be installed: torch imports dill when present, and
# setuptools' distutils hook (a .pth file) runs in every process.
OPTIONAL = {"dill", "setuptools"}
BLOCKER = """
import importlib.abc, sys
BLOCKED = {"airflow", "pyspark", "great_expectations", "petastorm"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on a serving host")
sys.meta_path.insert(0, Blocker())
"""


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\[\]-]+)==([^\s#]+)", line.strip())
        if match:
            found[re.sub(r"\[.*\]", "", match.group(1)).lower().replace("_", "-")] = match.group(2)
    return found


def test_the_serving_requirements_are_a_subset_of_the_pipeline_stack():
    serve, full = pins(REPO / "requirements-serve.txt"), pins(REPO / "requirements.txt")
    assert serve and not [name for name in serve if name.startswith(FORBIDDEN)]
    assert {name: full.get(name) for name in serve} == serve  # same versions: one tested stack
    assert 'optional-dependencies.serve = {file = ["requirements-serve.txt"]}' in (REPO / "pyproject.toml").read_text()


def _blocked(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    return subprocess.run([sys.executable, "-c", BLOCKER + code, *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300, **kwargs)


@pytest.mark.skipif(not OPENCLIPART.is_dir(), reason="sample catalog (openclipart-png) not installed")
def test_the_serving_path_runs_without_the_pipeline_packages(tmp_path):
    catalog = RealCatalog(tmp_path, per_category=2)
    catalog.publish()
    dest = tmp_path / "serving"
    product, _, photo = catalog.images[3]

    # pull, open, embed a query image, search, score: in one process without the pipeline packages,
    # then the distributions it loaded.
    probe = _blocked("""
import importlib.metadata as md, json, sys
from pathlib import Path
from pipelines.cli import main
assert main(["pull", "--warehouse", sys.argv[1], "--dest", sys.argv[2]]) == 0
assert main(["score", "--snapshot-dir", sys.argv[2], "--queries", "5"]) == 0
from pipelines.client import SnapshotClient
from pipelines.serve import ServeSettings, create_app
create_app(ServeSettings(snapshot_dir=sys.argv[2]))
[result] = SnapshotClient(sys.argv[2], mmap=True).search_images([sys.argv[3]], k=2)
names = md.packages_distributions()
loaded = sorted({d for m in list(sys.modules) for d in names.get(m.split(".")[0], [])})
print(json.dumps({"top": result.results[0].product_id, "loaded": loaded}))
""", catalog.uri, str(dest), str(photo))
    assert probe.returncode == 0, probe.stderr[-3000:]
    report = json.loads(probe.stdout.strip().splitlines()[-1])
    assert report["top"] == product
    full, serve = pins(REPO / "requirements.txt"), pins(REPO / "requirements-serve.txt")
    loaded = {name.lower().replace("_", "-") for name in report["loaded"]}
    assert {name for name in loaded if name in full} - OPTIONAL <= set(serve), "pinned in requirements.txt, loaded by the " \
        "serving path, missing from requirements-serve.txt"

    # `catalog-index serve` itself, as a serving host runs it, answering over HTTP.
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", BLOCKER + "import sys\nfrom pipelines.cli import main\n"
                               "sys.exit(main(sys.argv[1:]))", "serve", "--snapshot-dir", str(dest),
                               "--port", str(port)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read().decode()[-3000:] \
                if server.poll() is not None else "serve did not become ready"
            time.sleep(0.2)
        answer = requests.post(url + "/v1/search?k=2", files={"image": photo.read_bytes()}, timeout=60)
        assert answer.status_code == 200 and answer.json()["results"][0]["product_id"] == product
    finally:
        server.terminate()
        server.wait(30)
