"""The snapshot asset names the warehouse's LATEST (not the repository), publish and the serving
DAG share it, and the serving DAG's task pulls, re-verifies and checks what was announced."""
from __future__ import annotations

import os

import pytest

from pipelines.config import IndexSettings, load_settings
from pipelines.index import build_index
from pipelines.layout import latest_uri
from pipelines.pipeline import pull_announced_snapshot, snapshot_event
from pipelines.publish import publish_snapshot
from pipelines.snapshot import SnapshotVerificationError
from pipelines.storage import open_storage
from synthetic_catalog import MODEL, write_catalog


def test_publish_and_the_serving_dag_share_the_warehouse_latest_asset(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    warehouse = (tmp_path / "wh").as_uri()
    monkeypatch.setenv("CATALOG_INDEX_WAREHOUSE", warehouse)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(os.path.join(os.path.dirname(__file__), "..", "dags")))
    assert bag.import_errors == {}
    expected = latest_uri(warehouse, "catalog")
    assert expected == f"{warehouse}/indexes/catalog/LATEST"
    for dag_id in ("catalog_nightly_reindex", "catalog_backfill"):
        [outlet] = bag.dags[dag_id].get_task("publish").outlets
        assert (outlet.name, outlet.uri) == ("catalog_index_snapshot", expected)
    serving = bag.dags["catalog_serving_pull"]
    assert type(serving.timetable).__name__ == "AssetTriggeredTimetable"
    assert [(a.name, a.uri) for a in serving.timetable.asset_condition.objects] == [("catalog_index_snapshot", expected)]
    assert list(serving.task_dict) == ["pull_and_verify"] and serving.max_active_runs == 1


def test_the_serving_pull_checks_what_was_announced(tmp_path):
    uri = (tmp_path / "wh").as_uri()
    storage = open_storage(uri)
    write_catalog(storage, "r1", {"food": 60, "toys": 40})
    settings = load_settings(warehouse=uri)
    cfg = IndexSettings(recall_queries=10)

    def publish():
        built = build_index(settings, "r1", model=MODEL, cfg=cfg, runner="local")
        return publish_snapshot(storage, "catalog", snapshot_id=built.snapshot_id).snapshot_id

    first = publish()
    announced = snapshot_event(settings)
    assert announced["snapshot_id"] == first and len(announced["manifest_sha256"]) == 64
    dest = tmp_path / "serving"
    summary = pull_announced_snapshot(settings, str(dest), announced)
    assert summary["snapshot_id"] == first and summary["changed"] and not summary["superseded"]
    assert summary["manifest_sha256"] == announced["manifest_sha256"]
    assert (dest / "current" / "manifest.json").is_file()

    second = publish()  # LATEST moved on before the run for `first` started: the newer one is pulled
    later = pull_announced_snapshot(settings, str(dest), announced)
    assert later["snapshot_id"] == second and later["superseded"] and later["previous"] == first

    forged = {"snapshot_id": second, "manifest_sha256": "0" * 64}
    with pytest.raises(SnapshotVerificationError, match="announced"):
        pull_announced_snapshot(settings, str(dest), forged)
    assert pull_announced_snapshot(settings, str(dest), None)["snapshot_id"] == second  # a manual run
