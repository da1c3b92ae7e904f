"""Spark session and task dispatch shared by every stage.

A stage's work is a plain picklable function over one task description (a slice of
rows, a shard...). `run_tasks` decides where the tasks run: on Spark (a local[*]
session started here, or the cluster that spark-submit gave us), or sequentially in
this process (`runner="local"`, handy for debugging). Stage code never depends on which.
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from pipelines.config import Settings
from pipelines.progress import make_progress

INFRA_SPARK = Path(__file__).resolve().parents[1] / "infra" / "spark"


def read_profile(profile: str) -> dict[str, str]:
    """spark-defaults style `key value` lines from infra/spark/<profile>.conf (or a path)."""
    path = Path(profile) if profile.endswith(".conf") else INFRA_SPARK / f"{profile}.conf"
    if not path.is_file():
        return {}
    conf = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf[key.strip()] = value.strip()
    return conf


def session_conf(settings: Settings, *, under_submit: bool = False) -> dict[str, str]:
    """The Spark conf a job's own session starts with: the profile file, then settings.spark.conf.

    Under spark-submit only settings.spark.conf: its --master/--properties-file/--conf decide, and a
    value set here would override them (the driver JVM already runs, executors' Java options are
    the cluster's)."""
    if under_submit:
        return dict(settings.spark.conf)
    conf = {**read_profile(settings.spark.profile), **settings.spark.conf}
    log4j = INFRA_SPARK / "log4j2.properties"
    if log4j.is_file():
        # Keep Spark's own INFO/WARN chatter out of the user's terminal: appended to the profile's
        # own Java options (JIT flags in local.conf), unless they name a log4j configuration.
        for key in ("spark.driver.extraJavaOptions", "spark.executor.extraJavaOptions"):
            options = conf.get(key, "")
            if "-Dlog4j.configurationFile=" not in options:
                conf[key] = f"{options} -Dlog4j.configurationFile=file:{log4j}".strip()
    return conf


def get_spark(settings: Settings, app_name: str):
    """The active SparkSession (spark-submit) or a new one from settings.spark."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    # Executors must run the same interpreter (the project's venv) as the driver.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    under_submit = "PYSPARK_GATEWAY_PORT" in os.environ
    if not under_submit:
        builder = builder.master(settings.spark.master)
    conf = session_conf(settings, under_submit=under_submit)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.spark.log_level)
    return spark


def default_parallelism(spark) -> int:
    """How many tasks the session runs at once (1 without a session: the local runner)."""
    return max(1, spark.sparkContext.defaultParallelism) if spark is not None else 1


def _task_context():
    """The running Spark task's context, or None outside a task (or without pyspark)."""
    try:
        from pyspark import (
            TaskContext,  # pyspark: kept out of import time (serving hosts lack it)
        )
    except ImportError:
        return None
    return TaskContext.get()


def task_cpus() -> int | None:
    """spark.task.cpus inside a Spark task, else None (a local run owns the machine)."""
    context = _task_context()
    return max(1, int(context.cpus())) if context is not None else None


def task_resources() -> dict | None:
    """The running task's resources ({"gpu": ResourceInformation(...)}), else None."""
    context = _task_context()
    return context.resources() if context is not None else None


def gpu_resource_profile(task_gpus: float):
    """A stage-level resource profile asking `task_gpus` GPUs per task, so that only the
    stage that needs GPUs (embed) holds them; the executors must offer GPUs
    (spark.executor.resource.gpu.amount + a discovery script, see infra/spark/gpu.conf)."""
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    return ResourceProfileBuilder().require(TaskResourceRequests().cpus(1).resource("gpu", task_gpus)).build


def run_tasks(fn: Callable[[Any], Any], tasks: Sequence[Any], *, runner: str = "spark", spark=None,
              description: str = "working", job_group: str | None = None, task_gpus: float = 0.0) -> list[Any]:
    """Run fn over every task, one Spark task each, and return the results in task order.

    `spark` may be a SparkSession or a factory for one: it is called only when there is work,
    so a stage with nothing to do never starts Spark."""
    if not tasks:
        return []
    if runner == "local":
        results = []
        with make_progress() as progress:
            bar = progress.add_task(description, total=len(tasks))
            for task in tasks:
                results.append(fn(task))
                progress.advance(bar)
        return results
    if callable(spark):
        spark = spark()
    if spark is None:
        raise ValueError("runner='spark' needs a SparkSession")
    sc = spark.sparkContext
    if job_group:
        sc.setJobGroup(job_group, description)
    rdd = sc.parallelize(list(enumerate(tasks)), len(tasks)).map(lambda item: (item[0], fn(item[1])))
    if task_gpus > 0:
        rdd = rdd.withResources(gpu_resource_profile(task_gpus))
    done = threading.Event()
    watcher = threading.Thread(target=_watch_spark_progress, args=(sc, description, len(tasks), done), daemon=True)
    watcher.start()
    try:
        pairs = rdd.collect()
    finally:
        done.set()
        watcher.join(timeout=5)
    return [result for _, result in sorted(pairs, key=lambda p: p[0])]


def _watch_spark_progress(sc, description: str, total: int, done: threading.Event) -> None:
    """Show completed Spark tasks of the running job as a progress bar (driver side)."""
    tracker = sc.statusTracker()
    with make_progress() as progress:
        bar = progress.add_task(description, total=total)
        while True:
            finished = done.wait(0.5)
            completed = 0
            for stage_id in tracker.getActiveStageIds():
                info = tracker.getStageInfo(stage_id)
                if info is not None:
                    completed = max(completed, info.numCompletedTasks)
            progress.update(bar, completed=total if finished else completed)
            if finished:
                return
