"""The snapshot asset names the warehouse's LATEST (not the repository), one asset per warehouse;
publish emits its event for the warehouse the run published to, which the serving DAG of that
warehouse (and no other) is scheduled on; the serving DAG's task pulls, re-verifies and checks
what was announced."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pipelines.config import IndexSettings, load_settings
from pipelines.index import build_index
from pipelines.layout import latest_key, latest_uri
from pipelines.pipeline import pull_announced_snapshot, snapshot_event
from pipelines.publish import publish_snapshot
from pipelines.snapshot import SnapshotVerificationError
from pipelines.storage import open_storage
from synthetic_catalog import MODEL, write_catalog

DAGS = Path(__file__).resolve().parents[1] / "dags"


@pytest.fixture
def airflow_home(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path / "airflow"))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


def _parse_dag_file(file: str, warehouse: str, monkeypatch):
    """A DAG file parsed as the scheduler parses it with CATALOG_INDEX_WAREHOUSE=warehouse."""
    monkeypatch.setenv("CATALOG_INDEX_WAREHOUSE", warehouse)
    spec = importlib.util.spec_from_file_location(f"{Path(file).stem}_{abs(hash(warehouse))}", DAGS / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_and_the_serving_dag_share_the_warehouse_latest_asset(tmp_path, monkeypatch, airflow_home):
    warehouse = (tmp_path / "wh").as_uri()
    monkeypatch.setenv("CATALOG_INDEX_WAREHOUSE", warehouse)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    expected = latest_uri(warehouse, "catalog")
    assert expected == f"{warehouse}/indexes/catalog/LATEST"
    for dag_id in ("catalog_nightly_reindex", "catalog_backfill"):
        # an alias: the run, not the parse, decides which warehouse's asset its event is for
        [outlet] = bag.dags[dag_id].get_task("publish").outlets
        assert (type(outlet).__name__, outlet.name) == ("AssetAlias", "catalog_index_snapshot")
    serving = bag.dags["catalog_serving_pull"]
    assert type(serving.timetable).__name__ == "AssetTriggeredTimetable"
    # named by its URI: Airflow identifies an asset by name and URI and keeps one active asset per name
    assert [(a.name, a.uri) for a in serving.timetable.asset_condition.objects] == [(expected, expected)]
    assert list(serving.task_dict) == ["pull_and_verify"] and serving.max_active_runs == 1


def test_a_run_announces_the_warehouse_it_published_to(tmp_path, monkeypatch, airflow_home):
    """A DAG file parsed with warehouse A, a run whose conf names warehouse B: the event is for B's
    LATEST, the asset B's serving DAG is scheduled on, and nothing is announced to A's."""
    from airflow.sdk.execution_time.context import OutletEventAccessors
    from airflow.sdk.definitions.asset import AssetUniqueKey

    default, published = (tmp_path / "a").as_uri(), (tmp_path / "b").as_uri()
    dags = _parse_dag_file("catalog_index_dags.py", default, monkeypatch)
    serving_a = _parse_dag_file("catalog_serving_dags.py", default, monkeypatch)
    serving_b = _parse_dag_file("catalog_serving_dags.py", published, monkeypatch)
    snapshot_id, manifest_sha256 = "20261123T031500.123Z-1a2b", "ab" * 32
    open_storage(published).write_text(latest_key("catalog"), json.dumps(
        {"snapshot_id": snapshot_id, "manifest_sha256": manifest_sha256}))

    params = {**dags.nightly.params.validate(), "warehouse": published}
    assert dags.nightly.params["warehouse"] == default
    outlet_events = OutletEventAccessors()
    dags.announce_snapshot({"params": params, "outlet_events": outlet_events})

    [(key, accessor)] = outlet_events._dict.items()  # the alias only: no event for a concrete asset of A
    assert key.name == dags.nightly.get_task("publish").outlets[0].name
    [event] = accessor.asset_alias_events
    assert event.dest_asset_key == AssetUniqueKey.from_asset(serving_b.SNAPSHOT_ASSET)
    assert event.dest_asset_key.uri == latest_uri(published, "catalog")
    assert event.dest_asset_key != AssetUniqueKey.from_asset(serving_a.SNAPSHOT_ASSET)
    assert event.extra == {"snapshot_id": snapshot_id, "manifest_sha256": manifest_sha256}


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


def test_one_warehouse_is_one_asset_however_it_is_spelt(tmp_path):
    """A publish to `/srv/wh` must trigger a serving DAG configured with `file:///srv/wh/`: Airflow
    matches assets by URI string, so the URI is canonical."""
    real = tmp_path / "wh"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    spellings = [str(real), str(real) + "/", real.as_uri(), real.as_uri() + "/", str(tmp_path / "x" / ".." / "wh"),
                 str(tmp_path / "link"), (tmp_path / "link").as_uri()]
    assert {latest_uri(spelling, "catalog") for spelling in spellings} == {f"{real.resolve().as_uri()}/indexes/catalog/LATEST"}
    assert latest_uri("s3://bucket//team/wh/", "catalog") == latest_uri("s3://bucket/team/wh", "catalog") \
        == "s3://bucket/team/wh/indexes/catalog/LATEST"
    assert latest_uri("s3://bucket", "catalog") == "s3://bucket/indexes/catalog/LATEST"
