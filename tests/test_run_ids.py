"""Run ids (invariant 7): every DAG run gets one from run_after, also with no logical date; the nightly
refuses Airflow backfill runs; the crawl refuses a run id older than the newest committed run."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import pendulum
import pytest

from pipelines.cli import main as cli_main
from pipelines.config import load_settings
from pipelines.crawl.stage import HistoryRewrite, check_run_order, run_crawl
from pipelines.layout import crawl_success_key
from pipelines.storage import open_storage

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dags(tmp_path_factory):
    import os

    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow-home")))
    spec = importlib.util.spec_from_file_location("catalog_index_dags_run_ids", REPO / "dags" / "catalog_index_dags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(run_after: str | None, run_type: str = "manual", logical_date=None):
    return SimpleNamespace(run_id=f"{run_type}__x", run_type=run_type, logical_date=logical_date,
                           run_after=pendulum.parse(run_after) if run_after else None)


def test_run_ids_come_from_run_after_and_sort_in_time_order(dags):
    ids = [dags.catalog_run_id({}, run(t), dags.NIGHTLY_DAG_ID) for t in (
        "2026-11-23T02:00:00+00:00", "2026-11-23T14:15:03.250+00:00", "2026-11-23T14:15:03.999+00:00",
        "2026-11-23T16:15:04+01:00", "2026-11-24T02:00:00+00:00")]
    assert ids == ["20261123T020000Z", "20261123T141503.250Z", "20261123T141503.999Z", "20261123T151504Z",
                   "20261124T020000Z"]
    assert ids == sorted(ids)
    assert dags.catalog_run_id({"run_id": "20261125T020000Z"}, run("2026-11-23T02:00:00+00:00"),
                               dags.BACKFILL_DAG_ID) == "20261125T020000Z"


def test_the_nightly_refuses_airflow_backfill_runs_and_points_to_catalog_backfill(dags):
    from airflow.sdk.exceptions import AirflowFailException

    with pytest.raises(AirflowFailException, match="trigger the catalog_backfill DAG"):
        dags.catalog_run_id({}, run("2026-01-03T02:00:00+00:00", "backfill"), dags.NIGHTLY_DAG_ID)
    assert dags.catalog_run_id({}, run("2026-01-03T02:00:00+00:00", "scheduled"), dags.NIGHTLY_DAG_ID) == \
        "20260103T020000Z"


def test_the_failure_callback_never_fails_whatever_the_context(dags, caplog):
    ti = SimpleNamespace(dag_id="catalog_backfill", task_id="crawl", try_number=1)
    for context in ({"ti": ti, "params": {"warehouse": "file:///w"}, "dag_run": run("2026-11-23T02:00:00+00:00")},
                    {"ti": ti, "params": {}, "dag_run": run(None)},   # no run_after, no logical date
                    {"ti": ti}):
        with caplog.at_level(logging.ERROR):
            dags.notify_failure(context)
    assert "reports/20261123T020000Z/report.html" in caplog.text
    assert caplog.text.count("failed at crawl") == 3


def _commit(storage, run_id):
    storage.write_text(crawl_success_key(run_id), "{}")


def test_crawl_refuses_run_ids_older_than_the_newest_committed_run(tmp_path, capsys):
    uri = (tmp_path / "wh").as_uri()
    storage = open_storage(uri)
    check_run_order(storage, "20261123T020000Z")       # nothing committed yet
    _commit(storage, "20261124T020000Z")
    check_run_order(storage, "20261124T020000Z")       # the newest itself: a retry of the same run
    check_run_order(storage, "20261125T020000Z")
    with pytest.raises(HistoryRewrite, match="sorts before the newest committed run 20261124T020000Z.*catalog_backfill"):
        check_run_order(storage, "20261123T020000Z")
    check_run_order(storage, "20261123T020000Z", rewrite_history=True)
    manifest = tmp_path / "m.csv"
    manifest.write_text("product_id,category,image_url\np1,food,http://127.0.0.1:9/x.png\n")
    with pytest.raises(HistoryRewrite):
        run_crawl(load_settings(warehouse=uri), str(manifest), "20261123T020000Z", runner="local")
    assert not storage.list("runs/20261123T020000Z/")   # refused before anything was written
    code = cli_main(["crawl", "--warehouse", uri, "--manifest", str(manifest), "--run-id", "20261123T020000Z",
                     "--runner", "local"])
    assert code == 1 and "--rewrite-history" in capsys.readouterr().err.replace("\n", " ")
