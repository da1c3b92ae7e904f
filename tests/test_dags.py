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
