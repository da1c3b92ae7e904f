"""Airflow DAGs of catalog-index: the nightly reindex and the category backfill.

Scheduling only: every task runs one pipeline stage through `pipelines.pipeline.run_stage`
(in-process, local Spark) or, when a Spark connection is configured, submits the stage's
job file (`jobs/<stage>.py`) with SparkSubmitOperator. No stage logic lives here.

Environment (read when the DAG file is parsed):
  CATALOG_INDEX_WAREHOUSE         warehouse URI (default ~/.catalog-index/warehouse)
  CATALOG_INDEX_MANIFEST          default manifest URI for the nightly run
  CATALOG_INDEX_SCHEDULE          cron for the nightly run (default "0 2 * * *")
  CATALOG_INDEX_SPARK_CONN_ID     set to a Spark connection id to spark-submit the stages
  CATALOG_INDEX_GPU_POOL          Airflow pool that caps concurrent GPU embedding tasks
  CATALOG_INDEX_PUBLISH_POOL      single-slot Airflow pool shared by build_index and publish of both DAGs
                                  (default catalog_index_publish; create it once:
                                  `airflow pools set catalog_index_publish 1 "catalog-index build+publish"`)

Run ids: `params.run_id` if given, else the DAG run's `run_after` (present for every run, also one
triggered with no logical date), e.g. 20261123T020000Z, or 20261123T141503.250Z for a manual trigger
that did not fall on a whole second. Run ids sort in time order; the crawl refuses one older than the
newest committed run (rewrite_history overrides), and the nightly refuses Airflow backfill runs:
re-doing categories is the catalog_backfill DAG's job.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Asset, AssetAlias, Param, task

from pipelines.layout import latest_uri

REPO = Path(__file__).resolve().parents[1]
SPARK_CONN_ID = os.environ.get("CATALOG_INDEX_SPARK_CONN_ID")
GPU_POOL = os.environ.get("CATALOG_INDEX_GPU_POOL", "default_pool")
# build_index and publish of both DAGs take the one slot in turn, so that a backfill and the nightly do not
# build on the same live snapshot and then race to publish (publish's compare-and-swap catches what remains).
PUBLISH_POOL = os.environ.get("CATALOG_INDEX_PUBLISH_POOL", "catalog_index_publish")
NIGHTLY_DAG_ID, BACKFILL_DAG_ID = "catalog_nightly_reindex", "catalog_backfill"
DEFAULT_WAREHOUSE = os.environ.get("CATALOG_INDEX_WAREHOUSE", (Path.home() / ".catalog-index" / "warehouse").as_uri())
# The publish task's outlet. A run publishes to its `warehouse` param, which need not be the warehouse
# this file was parsed with, so the asset is chosen at run time: each publish emits, through this alias,
# one event for snapshot_asset(<the run's warehouse>) whose extra is {"snapshot_id", "manifest_sha256"}.
# dags/catalog_serving_dags.py is scheduled on the asset of its own warehouse.
SNAPSHOT_ALIAS = AssetAlias(name="catalog_index_snapshot")
log = logging.getLogger(__name__)

# Stage -> execution timeout in hours.
STAGE_TIMEOUTS = {"crawl": 4, "dedup": 2, "validate": 1, "embed": 6, "build_index": 3, "validate_index": 1,
                  "publish": 1}


def snapshot_asset(warehouse: str) -> Asset:
    """The asset of a warehouse's LATEST pointer, named by its URI (as dags/catalog_serving_dags.py names it).
    Airflow identifies an asset by name and URI and activates one asset per name: a name shared by
    the LATEST of two warehouses would leave one of them without consumers."""
    return Asset(uri=latest_uri(warehouse, "catalog"))


def run_id_from_run_after(run_after) -> str:
    """20261123T020000Z, or 20261123T141503.250Z when run_after is not on a whole second (a manual trigger):
    two triggers within one second of each other still get two run ids."""
    run_after = run_after.astimezone(pendulum.UTC)
    millis = run_after.microsecond // 1000
    return run_after.strftime("%Y%m%dT%H%M%S") + (f".{millis:03d}Z" if millis else "Z")


def catalog_run_id(params: dict, dag_run, dag_id: str) -> str:
    """The pipeline run id of one DAG run, the same in every task, try and execution mode.

    Raises AirflowFailException for an Airflow backfill run of the nightly: its run ids (logical dates in
    the past) sort before committed runs, which later stages read as history."""
    run_type = str(getattr(getattr(dag_run, "run_type", None), "value", getattr(dag_run, "run_type", "")))
    if dag_id == NIGHTLY_DAG_ID and run_type == "backfill":
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(
            f"{NIGHTLY_DAG_ID} does not run as an Airflow backfill (run {getattr(dag_run, 'run_id', '?')}): a night in "
            "the past would sort before runs already committed and rewrite history they depend on. To redo some "
            f"categories, trigger the {BACKFILL_DAG_ID} DAG with conf {{\"categories\": [...]}}; to rerun the whole "
            f"catalog now, trigger {NIGHTLY_DAG_ID} without a logical date")
    if params.get("run_id"):
        return params["run_id"]
    run_after = getattr(dag_run, "run_after", None) or getattr(dag_run, "logical_date", None)
    if run_after is None:
        raise ValueError(f"DAG run {getattr(dag_run, 'run_id', '?')} has neither run_after nor a logical date: "
                         "pass conf {\"run_id\": \"20261123T020000Z\"}")
    return run_id_from_run_after(run_after)


def _context_run_id(context) -> str:
    """The run id for messages: never raises (a failure callback must not fail too)."""
    try:
        return catalog_run_id(context.get("params") or {}, context.get("dag_run"), "")
    except Exception:  # noqa: BLE001
        return str(getattr(context.get("dag_run"), "run_id", "unknown"))


def notify_failure(context) -> None:
    """Failure callback: one line that says which night, which stage, and where to look."""
    ti = context["ti"]
    run_id = _context_run_id(context)
    log.error("catalog-index %s failed at %s (try %s). Run report: %s/reports/%s/report.html. "
              "Fix and clear the task to resume: finished Spark tasks are not redone.",
              ti.dag_id, ti.task_id, ti.try_number, (context.get("params") or {}).get("warehouse"), run_id)


DEFAULT_ARGS = {
    "owner": "data-engineering",
    "retries": 2,
    "retry_delay": timedelta(minutes=5),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "on_failure_callback": notify_failure,
}


def _settings_overrides(params: dict) -> dict:
    return {"warehouse": params["warehouse"], "crawl": {"allow_private_hosts": params["allow_private_hosts"]}}


def run_stage_in_process(stage: str, params: dict, run_id: str) -> dict:
    """Run one stage here (local Spark); returns a small JSON-able summary for XCom."""
    # imported by the task, not the DAG file: keeps pandas/pyarrow/Spark out of its import time (the scheduler parses it often)
    from pipelines.config import load_settings
    from pipelines.pipeline import PipelineStopped, RunContext, finish_run, run_stage
    from pipelines.spark import get_spark

    settings = load_settings(**_settings_overrides(params))
    ctx = RunContext(settings, run_id, manifest=params.get("manifest"), categories=params.get("categories") or None,
                     force=params["force"], rewrite_history=params.get("rewrite_history", False),
                     spark=lambda: get_spark(settings, f"catalog-index {stage} {run_id}"))
    try:
        result = run_stage(stage, ctx)
    except PipelineStopped as exc:
        from airflow.exceptions import AirflowFailException

        raise AirflowFailException(str(exc)) from exc  # a gate is not retried: it needs a person
    if stage == "publish":
        finish_run(settings, run_id, published_manifest=result.manifest, categories=ctx.categories, forced=ctx.force)
    return {"stage": stage, "run_id": run_id, "result": str(result)[:2000]}


def announce_snapshot(context) -> None:
    """The publish task's asset event: for the LATEST of the warehouse this run published to, with the
    snapshot LATEST now names and its manifest sha256."""
    # imported by the task, not the DAG file: keeps pandas/pyarrow/boto3 out of its import time
    from pipelines.config import load_settings
    from pipelines.pipeline import snapshot_event

    settings = load_settings(**_settings_overrides(context["params"]))
    context["outlet_events"][SNAPSHOT_ALIAS].add(snapshot_asset(settings.warehouse), extra=snapshot_event(settings))


# Stage -> the job file it spark-submits, and the validation stages a validate task checks.
JOBS = {"validate_index": "validate"}
VALIDATE_STAGES = {"validate": ["manifest", "images"], "validate_index": ["embeddings", "index"]}


def stage_argv(stage: str, params: dict, run_id: str) -> list[str]:
    """The command line of `jobs/<job>.py` for one task: the same inputs that run_stage_in_process
    hands the stage (warehouse, run id, manifest, categories, private hosts, --force for the gates)."""
    argv = ["--warehouse", params["warehouse"], "--run-id", run_id]
    categories = [str(c) for c in params.get("categories") or []]
    if stage == "crawl":
        argv += ["--manifest", params["manifest"]]
        if params.get("allow_private_hosts"):
            argv.append("--allow-private-hosts")
        if params.get("rewrite_history"):
            argv.append("--rewrite-history")
    if stage in ("crawl", "build_index") and categories:
        argv += ["--categories", *categories]
    if stage in VALIDATE_STAGES:
        argv += ["--stage", *VALIDATE_STAGES[stage]]  # jobs/validate.py checks them in order
        if params.get("force"):
            argv.append("--force")
    return argv


if SPARK_CONN_ID:
    from airflow.providers.apache.spark.operators.spark_submit import (
        SparkSubmitOperator,
    )

    class StageSubmitOperator(SparkSubmitOperator):
        """spark-submit one stage's job. `application_args` is one template rendering to a JSON list:
        per-item templates could neither splice a list param (--categories a b) nor drop an unset flag."""

        def render_template_fields(self, context, jinja_env=None) -> None:
            super().render_template_fields(context, jinja_env)
            if isinstance(self.application_args, str):
                self.application_args = json.loads(self.application_args)

        def execute(self, context):
            result = super().execute(context)
            if self.task_id == "publish":
                announce_snapshot(context)
            return result


RUN_ID_TEMPLATE = "catalog_run_id(params, dag_run, dag.dag_id)"


def _stage_task(stage: str, dag_id: str, **kwargs):
    timeout = timedelta(hours=STAGE_TIMEOUTS[stage])
    if SPARK_CONN_ID:
        job = JOBS.get(stage, stage)
        return StageSubmitOperator(
            task_id=stage, conn_id=SPARK_CONN_ID, application=str(REPO / "jobs" / f"{job}.py"),
            application_args="{{ stage_argv(%r, params, %s) | tojson }}" % (stage, RUN_ID_TEMPLATE),
            name="catalog-index %s {{ %s }}" % (stage, RUN_ID_TEMPLATE),
            properties_file=str(REPO / "infra" / "spark" / "cluster.conf"), execution_timeout=timeout, **kwargs)

    @task(task_id=stage, execution_timeout=timeout, **kwargs)
    def run(**context):
        params = context["params"]
        result = run_stage_in_process(stage, params, catalog_run_id(params, context["dag_run"], dag_id))
        if stage == "publish":
            announce_snapshot(context)
        return result

    return run()


def _pipeline(dag_id: str) -> None:
    tasks = [_stage_task("crawl", dag_id), _stage_task("dedup", dag_id), _stage_task("validate", dag_id),
             _stage_task("embed", dag_id, pool=GPU_POOL), _stage_task("build_index", dag_id, pool=PUBLISH_POOL),
             _stage_task("validate_index", dag_id),
             _stage_task("publish", dag_id, pool=PUBLISH_POOL, outlets=[SNAPSHOT_ALIAS])]
    for upstream, downstream in zip(tasks, tasks[1:]):
        upstream >> downstream


COMMON_PARAMS = {
    "warehouse": Param(DEFAULT_WAREHOUSE, type="string", description="file:///path or s3://bucket/prefix"),
    "manifest": Param(os.environ.get("CATALOG_INDEX_MANIFEST", str(REPO / "sample" / "manifest.csv")),
                      type="string", minLength=1,
                      description="catalog manifest URI (.csv/.parquet/.jsonl; path, http(s)://, s3://)"),
    "run_id": Param(None, type=["null", "string"], pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$",
                    description="default: the run's run_after time, e.g. 20261123T020000Z (also for a run triggered "
                                "with no logical date); must not sort before the newest committed run"),
    "rewrite_history": Param(False, type="boolean",
                             description="allow a run id older than the newest committed run (reruns an old night; "
                                         "image bytes that later runs reference are kept)"),
    "allow_private_hosts": Param(False, type="boolean", description="allow image URLs on private addresses"),
    "force": Param(False, type="boolean", description="publish even if a validation gate trips (recorded)"),
}

with DAG(
    dag_id=NIGHTLY_DAG_ID,
    description="crawl -> dedup -> validate -> embed -> build index -> validate index -> publish",
    schedule=os.environ.get("CATALOG_INDEX_SCHEDULE", "0 2 * * *"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(hours=12),
    default_args=DEFAULT_ARGS,
    params={**COMMON_PARAMS, "categories": Param([], type="array", description="empty: every category")},
    tags=["catalog-index"],
    doc_md=__doc__,
    user_defined_macros={"stage_argv": stage_argv, "catalog_run_id": catalog_run_id},
) as nightly:
    _pipeline(NIGHTLY_DAG_ID)

with DAG(
    dag_id=BACKFILL_DAG_ID,
    description="rerun the pipeline for some categories; other categories' shards stay byte-identical",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={**COMMON_PARAMS, "categories": Param(type="array", minItems=1, items={"type": "string", "minLength": 1},
                                                 description="categories to backfill (required)")},
    tags=["catalog-index"],
    doc_md=__doc__,
    user_defined_macros={"stage_argv": stage_argv, "catalog_run_id": catalog_run_id},
) as backfill:
    _pipeline(BACKFILL_DAG_ID)
