"""The nightly pipeline as one sequence of stages, shared by `catalog-index run/backfill` and the DAGs.

    crawl -> dedup -> validate (manifest, images) -> embed -> validate (embeddings)
          -> build-index -> validate (index) -> publish

`run_stage` runs one named stage for a run id; `run_pipeline` runs them in order, stops at
the first stage or gate that refuses (nothing is published then), times every stage and
writes the run report either way. Stage logic lives in the stage modules; this module only
sequences them, so Airflow tasks and the one-command run do exactly the same work.
`finish_run` writes the run report, in one place for the CLI, the DAG and `jobs/publish.py`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipelines.client import pull
from pipelines.config import Settings
from pipelines.crawl import run_crawl
from pipelines.dedup import run_dedup
from pipelines.embed import run_embed, spec_from_settings
from pipelines.errors import StageRefused, UsageError
from pipelines.index import build_index, index_settings_from
from pipelines.publish import holding_live_snapshot, publish_snapshot
from pipelines.readers import backfill_index_scope, require_committed_dedup
from pipelines.report import build_report, search_samples_or_note, snapshot_summary
from pipelines.search import OpenSnapshot
from pipelines.snapshot import SnapshotVerificationError, read_latest
from pipelines.storage import open_storage
from pipelines.validate import validate_stages

STAGES = ["crawl", "dedup", "validate", "embed", "build_index", "validate_index", "publish"]


class PipelineStopped(StageRefused):
    """A stage or a gate stopped the run before publish; the published snapshot is untouched."""

    def __init__(self, stage: str, reason: str, report_key: str | None = None):
        super().__init__(f"run stopped at {stage}: {reason}")
        self.stage, self.reason, self.report_key = stage, reason, report_key


@dataclass
class RunContext:
    settings: Settings
    run_id: str
    manifest: str | None = None
    categories: list[str] | None = None
    force: bool = False
    rewrite_history: bool = False  # allow a run id older than the newest committed run (crawl refuses it otherwise)
    runner: str = "spark"
    spark: Any = None            # a SparkSession or a factory for one
    results: dict[str, Any] = field(default_factory=dict)

    def session(self):
        """The SparkSession validation runs on: Great Expectations needs Spark whatever the runner
        (`runner` only says where the other stages' tasks run)."""
        if callable(self.spark):
            self.spark = self.spark()
        return self.spark


def _crawl(ctx: RunContext):
    if not ctx.manifest:
        raise UsageError("the crawl stage needs a manifest (--manifest)")
    return run_crawl(ctx.settings, ctx.manifest, ctx.run_id, categories=ctx.categories, runner=ctx.runner,
                     spark=ctx.spark, rewrite_history=ctx.rewrite_history)


def _dedup(ctx: RunContext):
    return run_dedup(ctx.settings, ctx.run_id, runner=ctx.runner, spark=ctx.spark)


def _validate(ctx: RunContext, stages: tuple[str, ...]):
    return validate_stages(ctx.settings, ctx.run_id, stages, spark=ctx.session(), force=ctx.force)


def _embed(ctx: RunContext):
    return run_embed(ctx.settings, ctx.run_id, runner=ctx.runner, spark=ctx.spark)


def _build_index(ctx: RunContext):
    storage = open_storage(ctx.settings.warehouse, ctx.settings.s3)
    require_committed_dedup(storage, ctx.run_id)
    with holding_live_snapshot(storage, index_settings_from(ctx.settings).name):  # its shards may be copied
        return build_index(ctx.settings, ctx.run_id, model=spec_from_settings(ctx.settings.embed),
                           categories=backfill_index_scope(storage, ctx.run_id, ctx.categories), runner=ctx.runner,
                           spark=ctx.spark)


def _publish(ctx: RunContext):
    cfg = index_settings_from(ctx.settings)
    build = ctx.results.get("build_index")
    return publish_snapshot(open_storage(ctx.settings.warehouse, ctx.settings.s3), cfg.name,
                            snapshot_id=getattr(build, "snapshot_id", None), run_id=ctx.run_id,
                            keep_snapshots=cfg.keep_snapshots, retention_grace_hours=cfg.retention_grace_hours)


STAGE_FUNCTIONS: dict[str, Callable[[RunContext], Any]] = {
    "crawl": _crawl,
    "dedup": _dedup,
    "validate": lambda ctx: _validate(ctx, ("manifest", "images")),
    "embed": _embed,
    "build_index": _build_index,
    "validate_index": lambda ctx: _validate(ctx, ("embeddings", "index")),
    "publish": _publish,
}


def run_stage(stage: str, ctx: RunContext) -> Any:
    """Run one stage; translate the stage's refusals into PipelineStopped."""
    try:
        result = STAGE_FUNCTIONS[stage](ctx)
    except StageRefused as exc:
        raise PipelineStopped(stage, str(exc), getattr(exc, "report_key", None)) from exc
    ctx.results[stage] = result
    return result


def finish_run(settings: Settings, run_id: str, *, published_manifest: dict | None = None,
               stage_timings: dict[str, float] | None = None, categories: list[str] | None = None,
               forced: bool | None = None, stopped: str | None = None) -> dict[str, Any]:
    """Write the run report (reports/<run_id>/report.{html,json}) and return it.

    With `published_manifest` (the snapshot this run published) the report carries the
    snapshot's summary and a few example searches against it, pulled as a serving team would.
    """
    extra: dict[str, Any] = {}
    if categories is not None or forced is not None:
        extra.update({"categories": categories, "forced": forced})
    if published_manifest is not None:
        extra["snapshot"] = snapshot_summary(published_manifest)
    if stopped is not None:
        extra["stopped"] = stopped
    samples = (search_samples_or_note(settings, run_id, published_manifest["index_name"])
               if published_manifest is not None else None)
    return build_report(open_storage(settings.warehouse, settings.s3), run_id, stage_timings=stage_timings,
                        extra=extra, search_samples=samples)


def run_pipeline(ctx: RunContext, stages: list[str] | None = None,
                 on_stage: Callable[[str, float, Any], None] | None = None) -> dict[str, Any]:
    """Run the stages in order; always write the run report; re-raise PipelineStopped."""
    timings: dict[str, float] = {}
    stopped: PipelineStopped | None = None
    for stage in stages or STAGES:
        started = time.monotonic()
        try:
            result = run_stage(stage, ctx)
        except PipelineStopped as exc:
            stopped = exc
            timings[stage] = round(time.monotonic() - started, 2)
            break
        timings[stage] = round(time.monotonic() - started, 2)
        if on_stage:
            on_stage(stage, timings[stage], result)
    publish = ctx.results.get("publish")
    report = finish_run(ctx.settings, ctx.run_id, published_manifest=publish.manifest if publish else None,
                        stage_timings=timings, categories=ctx.categories, forced=ctx.force,
                        stopped=str(stopped) if stopped is not None else None)
    if stopped is not None:
        raise stopped
    return report


# ------------------------------------------------------------------------------------------
# the snapshot asset (Airflow): what a publish announces, what a serving host does with it
# ------------------------------------------------------------------------------------------

def snapshot_event(settings: Settings, index_name: str = "catalog") -> dict:
    """{"snapshot_id", "manifest_sha256"} of the snapshot LATEST names now: the extra of the asset
    event a publish emits, so that consumers can check what they pull against what was announced."""
    pointer = read_latest(open_storage(settings.warehouse, settings.s3), index_name)
    if pointer is None:
        raise UsageError(f"index {index_name!r} in {settings.warehouse} has no LATEST: nothing was published")
    return {"snapshot_id": pointer["snapshot_id"], "manifest_sha256": pointer.get("manifest_sha256")}


def pull_announced_snapshot(settings: Settings, dest: str, announced: dict | None,
                            index_name: str = "catalog") -> dict:
    """A serving host's answer to a snapshot event: pull LATEST into `dest` (every file's sha256
    verified, `current` swapped atomically), re-hash the local copy, and check it against the
    announced snapshot. LATEST may have moved on since the event (a newer publish, a rollback): the
    pull then serves what LATEST names now and says so; a snapshot with the announced id but another
    manifest is refused."""
    pulled = pull(settings.warehouse, dest, s3=settings.s3, index_name=index_name)
    opened = OpenSnapshot(pulled.path, verify=True)
    summary = {"snapshot_id": pulled.snapshot_id, "changed": pulled.changed, "previous": pulled.previous,
               "manifest_sha256": opened.manifest_sha256, "announced": announced,
               "vectors": opened.manifest["totals"]["vectors"]}
    if announced and announced.get("snapshot_id") == pulled.snapshot_id and announced.get("manifest_sha256") \
            and announced["manifest_sha256"] != opened.manifest_sha256:
        raise SnapshotVerificationError(f"snapshot {pulled.snapshot_id} was announced with manifest sha256 "
                                        f"{announced['manifest_sha256'][:12]}…, the pulled one has "
                                        f"{opened.manifest_sha256[:12]}…: do not serve it", ["manifest.json"])
    summary["superseded"] = bool(announced) and announced.get("snapshot_id") != pulled.snapshot_id
    return summary
