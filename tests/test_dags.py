"""The Airflow DAGs import cleanly and describe the pipeline in order, with the promised policies."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dags_import_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {"catalog_nightly_reindex", "catalog_backfill"} <= set(dagbag.dag_ids)


@pytest.mark.parametrize("dag_id", ["catalog_nightly_reindex", "catalog_backfill"])
def test_pipeline_order_and_policies(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    order = ["crawl", "dedup", "validate", "embed", "build_index", "validate_index", "publish"]
    for upstream, downstream in zip(order, order[1:]):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}
    assert dag.max_active_runs == 1 and not dag.catchup
    for task in dag.tasks:
        assert task.retries >= 1 and task.execution_timeout is not None and task.on_failure_callback
    assert [a.name for a in dag.get_task("publish").outlets] == ["catalog_index_snapshot"]


def test_schedules(dagbag):
    nightly, backfill = dagbag.dags["catalog_nightly_reindex"], dagbag.dags["catalog_backfill"]
    assert type(nightly.timetable).__name__ == "CronTriggerTimetable"
    assert type(backfill.timetable).__name__ == "NullTimetable"  # manual trigger only
    assert backfill.params.get_param("categories").schema["minItems"] == 1


@pytest.mark.spark
@pytest.mark.slow
def test_nightly_dag_test_publishes_a_snapshot(tmp_path):
    """`dag.test()` of the nightly DAG on a small sample crawled from a local HTTP server."""
    import json
    import subprocess
    import sys

    from pipelines.sample_catalog import ImageServer, build_sample_manifest, write_manifest_csv

    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "CATALOG_INDEX_NO_PROGRESS": "1"}
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    warehouse = (tmp_path / "wh").as_uri()
    with ImageServer() as server:
        manifest = write_manifest_csv(build_sample_manifest(server.base_url, 30), tmp_path / "manifest.csv")
        conf = {"manifest": str(manifest), "warehouse": warehouse, "allow_private_hosts": True,
                "run_id": "20261123T020000Z"}
        script = ("import json, sys; sys.path.insert(0, %r); import catalog_index_dags as d; "
                  "run = d.nightly.test(run_conf=json.loads(sys.argv[1])); print('STATE', run.state)") % str(REPO / "dags")
        result = subprocess.run([sys.executable, "-c", script, json.dumps(conf)], env=env, capture_output=True,
                                text=True, timeout=600)
    assert "STATE success" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    from pipelines.storage import open_storage

    storage = open_storage(warehouse)
    latest = json.loads(storage.read_text("indexes/catalog/LATEST"))
    manifest_json = json.loads(storage.read_text(f"indexes/catalog/{latest['snapshot_id']}/manifest.json"))
    assert manifest_json["source_run_id"] == "20261123T020000Z" and manifest_json["totals"]["vectors"] > 0
    assert storage.exists("reports/20261123T020000Z/report.html")  # the publish task writes the run report
