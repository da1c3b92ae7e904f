"""The Airflow DAGs import cleanly and describe the pipeline in order, with the promised policies;
with a Spark connection their tasks spark-submit the stage jobs with the right flags; `dag.test()`
of the nightly DAG publishes and announces it with an asset event that queues the serving DAG, and
of the backfill DAG leaves the other categories alone."""
import copy
import hashlib
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, unquote, urlsplit

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


def _job_commands(application: str, argv: list[str]) -> list[list[str]]:
    """The `catalog-index` command lines that jobs/<job>.py runs for `argv` (validate: one per --stage)."""
    module = importlib.import_module(f"jobs.{Path(application).stem}")
    if hasattr(module, "stage_commands"):
        return module.stage_commands(argv)
    return [[module.COMMAND, *argv]]


def _parse(command: list[str]):
    from pipelines.cli import build_parser

    try:
        return build_parser().parse_args(command)
    except SystemExit:  # argparse already printed why
        pytest.fail(f"the job would refuse its command line: catalog-index {' '.join(command)}")


@pytest.fixture
def spark_submit_dags(dagbag, monkeypatch):
    """The DAG file parsed again, as the scheduler parses it with CATALOG_INDEX_SPARK_CONN_ID set."""
    monkeypatch.setenv("CATALOG_INDEX_SPARK_CONN_ID", "spark_cluster")
    spec = importlib.util.spec_from_file_location("catalog_index_dags_spark_submit",
                                                  REPO / "dags" / "catalog_index_dags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _render(dag, conf: dict, run_after: str) -> dict:
    """Each task's rendered spark-submit: {task_id: (job file, [parsed catalog-index args, ...])}, for a run
    with no logical date (what `airflow dags trigger` without --logical-date creates)."""
    import pendulum

    params = copy.deepcopy(dag.params)
    params.update(conf)
    dag_run = SimpleNamespace(run_id="manual__" + run_after, run_type="manual", logical_date=None,
                              run_after=pendulum.parse(run_after))
    context = {"params": params.validate(), "dag_run": dag_run, "dag": dag}
    rendered = {}
    for task in map(copy.copy, dag.tasks):  # rendering sets attributes: keep the DAG's tasks as parsed
        assert type(task).__name__ == "StageSubmitOperator" and task._conn_id == "spark_cluster"
        assert Path(task.application).is_file() and Path(task.properties_file).is_file()
        task.render_template_fields(context)
        assert isinstance(task.application_args, list) and all(isinstance(a, str) for a in task.application_args)
        rendered[task.task_id] = (Path(task.application).name,
                                  [_parse(c) for c in _job_commands(task.application, task.application_args)])
    return rendered


def test_spark_submit_tasks_pass_what_the_in_process_tasks_get(spark_submit_dags):
    conf = {"warehouse": "s3://search/warehouse", "manifest": "s3://feeds/catalog.csv",
            "categories": ["food", "office supplies"], "force": True, "allow_private_hosts": True}
    tasks = _render(spark_submit_dags.backfill, conf, "2026-11-24T02:00:00+00:00")
    assert {task_id: job for task_id, (job, _) in tasks.items()} == {
        "crawl": "crawl.py", "dedup": "dedup.py", "validate": "validate.py", "embed": "embed.py",
        "build_index": "build_index.py", "validate_index": "validate.py", "publish": "publish.py"}
    for task_id, (_, parsed) in tasks.items():
        for args in parsed:
            assert (args.warehouse, args.run_id) == (conf["warehouse"], "20261124T020000Z"), task_id
    [crawl] = tasks["crawl"][1]
    assert (crawl.command, crawl.manifest, crawl.categories, crawl.allow_private_hosts) == (
        "crawl", conf["manifest"], ["food", "office supplies"], True)
    [build] = tasks["build_index"][1]
    assert (build.command, build.categories) == ("build-index", ["food", "office supplies"])
    assert [(a.command, a.stage, a.force) for a in tasks["validate"][1]] == [
        ("validate", "manifest", True), ("validate", "images", True)]
    assert [(a.command, a.stage, a.force) for a in tasks["validate_index"][1]] == [
        ("validate", "embeddings", True), ("validate", "index", True)]
    assert [a.command for a in tasks["dedup"][1] + tasks["embed"][1] + tasks["publish"][1]] == [
        "dedup", "embed", "publish"]

    # The nightly defaults: every category, gates enforced, SSRF guard on; run id from run_after unless given.
    nightly = _render(spark_submit_dags.nightly, {"run_id": "20261125T020000Z"}, "2026-11-24T02:00:00+00:00")
    [crawl] = nightly["crawl"][1]
    assert (crawl.categories, crawl.allow_private_hosts, crawl.run_id) == (None, None, "20261125T020000Z")
    assert nightly["build_index"][1][0].categories is None
    assert [a.force for a in nightly["validate"][1] + nightly["validate_index"][1]] == [False] * 4
    assert not crawl.rewrite_history
    manual = _render(spark_submit_dags.backfill, {"categories": ["food"], "rewrite_history": True},
                     "2026-11-24T14:15:03.250000+00:00")
    assert {args.run_id for _, parsed in manual.values() for args in parsed} == {"20261124T141503.250Z"}
    assert manual["crawl"][1][0].rewrite_history


@pytest.mark.parametrize("dag_id", ["catalog_nightly_reindex", "catalog_backfill"])
def test_build_index_and_publish_share_one_pool(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.get_task("build_index").pool == dag.get_task("publish").pool == "catalog_index_publish"


# ---------------------------------------------------------------------------------------
# dag.test(): the nightly run, then a backfill of one category on top of it
# ---------------------------------------------------------------------------------------

def _dag_test(env: dict, dag: str, conf: dict) -> subprocess.CompletedProcess:
    """`dag.test()` of a run with no logical date (as `airflow dags trigger` without --logical-date makes)."""
    script = ("import json, sys; sys.path.insert(0, %r); import catalog_index_dags as d; "
              "run = d.%s.test(run_conf=json.loads(sys.argv[1]), logical_date=None); "
              "print('STATE', run.state, 'LOGICAL', run.logical_date)") % (str(REPO / "dags"), dag)
    return subprocess.run([sys.executable, "-c", script, json.dumps(conf)], env=env, capture_output=True,
                          text=True, timeout=900)


def _tail(result: subprocess.CompletedProcess) -> str:
    return result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def nightly_run(tmp_path_factory):
    """`dag.test()` of the nightly DAG on 30 sample images crawled from a local HTTP server, with
    shards of at most 10 vectors (so a category backfill has other shards to keep). The server
    stays up for the module: a later run crawls the same URLs."""
    from pipelines.publish import read_latest, read_manifest
    from pipelines.sample_catalog import ImageServer, build_sample_manifest, write_manifest_csv
    from pipelines.storage import open_storage

    root = tmp_path_factory.mktemp("dag-test")
    warehouse = (root / "wh").as_uri()
    # dag.test() syncs every DAG of the folder to the DB: catalog_serving_pull is parsed for the run's
    # warehouse and, unpaused, is queued by the publish's asset event (no scheduler runs it here).
    env = {**os.environ, "AIRFLOW_HOME": str(root / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
           "CATALOG_INDEX_WAREHOUSE": warehouse, "CATALOG_INDEX_NO_PROGRESS": "1",
           "CATALOG_INDEX_INDEX__MAX_VECTORS_PER_SHARD": "10"}
    env.pop("CATALOG_INDEX_SPARK_CONN_ID", None)
    airflow = str(Path(sys.executable).parent / "airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    subprocess.run([airflow, "pools", "set", "catalog_index_publish", "1", "catalog-index build+publish"], env=env,
                   check=True, capture_output=True)
    with ImageServer() as server:
        rows = build_sample_manifest(server.base_url, 30)
        manifest = write_manifest_csv(rows, root / "manifest.csv")
        result = _dag_test(env, "nightly", {"manifest": str(manifest), "warehouse": warehouse,
                                            "allow_private_hosts": True})
        storage = open_storage(warehouse)
        latest = read_latest(storage, "catalog") if "STATE success" in result.stdout else None
        yield SimpleNamespace(env=env, server=server, rows=rows, warehouse=warehouse, storage=storage, result=result,
                              snapshot=read_manifest(storage, "catalog", latest["snapshot_id"]) if latest else None)


@pytest.mark.spark
@pytest.mark.slow
def test_nightly_dag_test_publishes_a_snapshot(nightly_run):
    assert "STATE success" in nightly_run.result.stdout, _tail(nightly_run.result)
    assert "LOGICAL None" in nightly_run.result.stdout
    snapshot = nightly_run.snapshot
    nightly_id = snapshot["source_run_id"]  # from run_after: the run had no logical date and no run_id param
    assert re.fullmatch(r"\d{8}T\d{6}(\.\d{3})?Z", nightly_id) and snapshot["totals"]["vectors"] > 0
    assert snapshot["totals"]["shards"] > 1  # shards of at most 10 vectors
    # The publish task writes the run report, with example searches against the new snapshot:
    # a catalog image finds its own product first; the HTML shows the query and hit pictures.
    report = json.loads(nightly_run.storage.read_text(f"reports/{nightly_id}/report.json"))
    assert report["snapshot"]["snapshot_id"] == snapshot["snapshot_id"]
    assert len(report["search_samples"]) >= 2
    for sample in report["search_samples"]:
        assert sample["results"], sample["query"]
        assert sample["query"].startswith(sample["results"][0]["product_id"] + " (")
    pictures = nightly_run.storage.read_text(f"reports/{nightly_id}/report.html").count("<img src='data:image")
    assert pictures >= sum(1 + len(sample["results"]) for sample in report["search_samples"])


# What the run left in its Airflow metadata DB, read with Airflow's own session and models.
ASSET_STATE_SCRIPT = """
import json
from sqlalchemy import select
from airflow.models.asset import AssetDagRunQueue, AssetEvent, AssetModel
from airflow.utils.session import create_session

with create_session() as session:
    print(json.dumps({
        "assets": [[a.name, a.uri] for a in session.scalars(select(AssetModel))],
        "events": [{"name": e.asset.name, "uri": e.asset.uri, "extra": e.extra, "dag_id": e.source_dag_id,
                    "task_id": e.source_task_id, "aliases": [a.name for a in e.source_aliases]}
                   for e in session.scalars(select(AssetEvent))],
        "queued": [[q.target_dag_id, q.asset.uri] for q in session.scalars(select(AssetDagRunQueue))],
    }))
"""


@pytest.mark.spark
@pytest.mark.slow
def test_nightly_publish_emits_the_asset_event_of_its_warehouse(nightly_run):
    """The publish task's event in the run's own Airflow DB: one, for the LATEST of the warehouse the
    run published to, announcing the snapshot and its manifest's sha256; catalog_serving_pull, parsed
    for that warehouse, is queued by it. (The backfill test may add its own event: it is not counted.)"""
    from pipelines.layout import latest_uri, snapshot_prefix
    from pipelines.snapshot import MANIFEST_FILE

    assert "STATE success" in nightly_run.result.stdout, _tail(nightly_run.result)
    result = subprocess.run([sys.executable, "-c", ASSET_STATE_SCRIPT], env=nightly_run.env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, _tail(result)
    state = json.loads(result.stdout.strip().splitlines()[-1])
    uri = latest_uri(nightly_run.warehouse, "catalog")
    snapshot_id = nightly_run.snapshot["snapshot_id"]
    manifest = nightly_run.storage.read_bytes(snapshot_prefix("catalog", snapshot_id) + MANIFEST_FILE)

    nightly = [e for e in state["events"] if e["dag_id"] == "catalog_nightly_reindex"]
    assert nightly == [{"name": uri, "uri": uri, "task_id": "publish", "dag_id": "catalog_nightly_reindex",
                        "aliases": ["catalog_index_snapshot"],
                        "extra": {"snapshot_id": snapshot_id,
                                  "manifest_sha256": hashlib.sha256(manifest).hexdigest()}}], state["events"]
    # Every event of the module's runs is for this warehouse's asset: none for another warehouse's
    # (the one the DAG file would default to without CATALOG_INDEX_WAREHOUSE) nor for a shared name.
    assert {(e["name"], e["uri"]) for e in state["events"]} == {(uri, uri)}
    assert [name for name, _ in state["assets"]] == [uri]
    assert ["catalog_serving_pull", uri] in state["queued"], state["queued"]


def _new_product(rows: list[dict], base_url: str) -> tuple[dict, bytes]:
    """A manifest row for a sample image not in `rows`, of a new product in one of their categories."""
    from pipelines.sample_catalog import OPENCLIPART_DIR, list_sample_images, product_id_for

    categories = {r["category"] for r in rows}
    products = {r["product_id"] for r in rows}
    listed = {unquote(urlsplit(r["image_url"]).path).lstrip("/") for r in rows}
    for category, path in list_sample_images():
        rel = path.relative_to(OPENCLIPART_DIR).as_posix()
        if category in categories and rel not in listed and product_id_for(category, path) not in products:
            return ({"product_id": product_id_for(category, path), "category": category,
                     "image_url": f"{base_url}/{quote(rel)}", "title": path.stem}, path.read_bytes())
    pytest.fail("no sample image left for a new product")


def _file_digests(storage, prefix: str) -> dict[str, str]:
    return {key: hashlib.sha256(storage.read_bytes(key)).hexdigest() for key in storage.list(prefix)}


@pytest.mark.spark
@pytest.mark.slow
def test_backfill_dag_leaves_other_categories_alone(nightly_run, tmp_path):
    """The analyst's backfill of one category (a new product in it): every shard without that
    category is kept byte for byte, and no image of another category is embedded again."""
    from pipelines.publish import read_latest, read_manifest
    from pipelines.sample_catalog import write_manifest_csv

    assert "STATE success" in nightly_run.result.stdout, _tail(nightly_run.result)
    storage, before = nightly_run.storage, nightly_run.snapshot
    row, image = _new_product(nightly_run.rows, nightly_run.server.base_url)
    category = row["category"]
    manifest = write_manifest_csv([*nightly_run.rows, row], tmp_path / "manifest.csv")
    embeddings_before = _file_digests(storage, "embeddings/")
    assert embeddings_before

    # An analyst's run id from the past is refused before anything is written: it would rewrite history.
    refused = _dag_test(nightly_run.env, "backfill", {
        "manifest": str(manifest), "warehouse": nightly_run.warehouse, "allow_private_hosts": True,
        "run_id": "20200101T000000Z", "categories": [category]})
    assert "STATE failed" in refused.stdout and "catalog_backfill" in _tail(refused), _tail(refused)
    assert "sorts before the newest committed run" in refused.stdout + refused.stderr
    assert not storage.list("runs/20200101T000000Z/")

    result = _dag_test(nightly_run.env, "backfill", {
        "manifest": str(manifest), "warehouse": nightly_run.warehouse, "allow_private_hosts": True,
        "categories": [category]})
    assert "STATE success" in result.stdout, _tail(result)

    latest = read_latest(storage, "catalog")
    after = read_manifest(storage, "catalog", latest["snapshot_id"], latest.get("manifest_sha256"))
    backfill_id = after["source_run_id"]
    assert backfill_id > before["source_run_id"] and after["previous_snapshot"] == before["snapshot_id"]
    assert after["base_snapshot"] == before["snapshot_id"]
    assert after["backfill"] == {"categories": [category], "base_snapshot": before["snapshot_id"]}
    assert after["totals"]["vectors"] == before["totals"]["vectors"] + 1  # the new product's image

    # Every shard without the category: kept under its id, the same files byte for byte. The category's
    # shard (with the categories packed beside it) is rebuilt under new shard ids.
    [old_home] = [s for s in before["shards"] if category in s["categories"]]
    others = [s for s in before["shards"] if category not in s["categories"]]
    assert others  # shards of at most 10 vectors: there is something to keep
    after_shards = {s["shard_id"]: s for s in after["shards"]}
    before_prefix = f"indexes/catalog/{before['snapshot_id']}/"
    after_prefix = f"indexes/catalog/{after['snapshot_id']}/"
    for old in others:
        kept = after_shards[old["shard_id"]]
        assert kept["categories"] == old["categories"] and kept["reused_from"] == before["snapshot_id"]
        assert kept["files"].keys() == old["files"].keys()
        for role, entry in kept["files"].items():
            assert storage.read_bytes(after_prefix + entry["path"]) == \
                storage.read_bytes(before_prefix + old["files"][role]["path"]), (old["shard_id"], role)
    rebuilt = [s for s in after["shards"] if not s.get("reused_from")]
    assert rebuilt and not {s["shard_id"] for s in rebuilt} & {s["shard_id"] for s in before["shards"]}
    assert sorted(c for s in rebuilt for c in s["categories"]) == old_home["categories"]
    assert len(after["shards"]) == len(others) + len(rebuilt)

    # Embeddings: nothing of the nightly cache rewritten or removed; the only new vector is the new image's.
    embeddings_after = _file_digests(storage, "embeddings/")
    assert {key: embeddings_after.get(key) for key in embeddings_before} == embeddings_before
    new_shas = [sha for key in sorted(set(embeddings_after) - set(embeddings_before)) if key.endswith(".parquet")
                for sha in storage.read_table(key, columns=["sha256"]).column("sha256").to_pylist()]
    assert new_shas == [hashlib.sha256(image).hexdigest()]
    embed = json.loads(storage.read_text(f"runs/{backfill_id}/embed/_SUCCESS.json"))
    assert embed["embedded"] == 1 and embed["quarantined"] == 0
