"""Airflow DAG of a serving host: pull each snapshot the pipeline publishes, as soon as it is published.

`catalog_serving_pull` is scheduled on the snapshot asset of its warehouse (the warehouse's
indexes/catalog/LATEST, named by that URI; see dags/catalog_index_dags.py). Each publish to that
warehouse emits an event whose extra carries the snapshot id and its manifest sha256; the task pulls LATEST into the serving destination (every file's sha256
verified, `current` swapped atomically), re-hashes the local copy and checks it against the
announced manifest. A `catalog-index serve --snapshot-dir DEST` on the same host picks it up on
its next refresh. No pipeline logic lives here.

Environment (read when the DAG file is parsed):
  CATALOG_INDEX_WAREHOUSE       warehouse URI (default ~/.catalog-index/warehouse)
  CATALOG_INDEX_SERVING_DEST    where snapshots are pulled to (default ~/.catalog-index/snapshots/catalog)
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Asset, Param, task

from pipelines.layout import latest_uri

DEFAULT_WAREHOUSE = os.environ.get("CATALOG_INDEX_WAREHOUSE", (Path.home() / ".catalog-index" / "warehouse").as_uri())
DEFAULT_DEST = os.environ.get("CATALOG_INDEX_SERVING_DEST", str(Path.home() / ".catalog-index" / "snapshots" / "catalog"))
# This warehouse's LATEST, named by its URI: the asset that the nightly and backfill DAGs' publish task
# emits an event for (through its alias) when a run publishes to this warehouse, and only then.
SNAPSHOT_ASSET = Asset(uri=latest_uri(DEFAULT_WAREHOUSE, "catalog"))
log = logging.getLogger(__name__)


def announced_snapshot(context) -> dict | None:
    """The extra of the newest event that triggered this run ({"snapshot_id", "manifest_sha256"})."""
    events = (context.get("triggering_asset_events") or {}).get(SNAPSHOT_ASSET) or []
    return dict(events[-1].extra or {}) if events else None


with DAG(
    dag_id="catalog_serving_pull",
    description="pull and verify each newly published catalog-index snapshot onto this serving host",
    schedule=[SNAPSHOT_ASSET],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "serving", "retries": 3, "retry_delay": timedelta(minutes=2)},
    params={"warehouse": Param(DEFAULT_WAREHOUSE, type="string", description="file:///path or s3://bucket/prefix"),
            "dest": Param(DEFAULT_DEST, type="string", minLength=1, description="local pull destination")},
    tags=["catalog-index", "serving"],
    doc_md=__doc__,
) as serving_pull:

    @task(task_id="pull_and_verify", execution_timeout=timedelta(hours=1))
    def pull_and_verify(**context) -> dict:
        # imported by the task, not the DAG file: keeps pandas/pyarrow/boto3 out of its import time
        from pipelines.config import load_settings
        from pipelines.pipeline import pull_announced_snapshot

        params = context["params"]
        summary = pull_announced_snapshot(load_settings(warehouse=params["warehouse"]), params["dest"],
                                          announced_snapshot(context))
        if summary["superseded"]:
            log.info("snapshot %s was announced; LATEST now names %s, which was pulled instead",
                     summary["announced"]["snapshot_id"], summary["snapshot_id"])
        return summary

    pull_and_verify()
