"""Prometheus metrics of the search service: requests and latency per endpoint, latency per step
(fetch, decode, embed, search, merge), the live snapshot (id, model, age, vectors) and reloads.

One process (`--workers 1`): one registry per app, not the process-global one, so that tests (and
a process embedding two apps) count separately.

`--workers N`: prometheus_client's multiprocess mode. `run_server` gives the workers a fresh private
directory (PROMETHEUS_MULTIPROC_DIR) where each worker's values live in its own files; whichever
worker answers a scrape merges every worker's files, so `/metrics` counts the whole service:
counters and histograms are summed over workers (dead ones included: totals never go backwards
when a worker is replaced), and the per-worker gauges (the snapshot a worker serves, its vectors,
build and load times, its age, its last refusal) carry a `pid` label, one series per live worker,
the same pid as the `X-Worker` response header: a worker stuck on an old snapshot shows as its own
series. A worker removes its live series when it stops; those of a worker killed outright are
removed by the next scrape (its pid is no longer a running sibling).

The snapshot age is computed at scrape time from the build timestamp (a `set_function` gauge does
not exist in multiprocess mode). This module must never serve another service's files: the
directory is private to one `run_server` and removed when it exits.
"""
from __future__ import annotations

import glob
import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"     # read by prometheus_client when it is imported
STEPS = ("fetch", "decode", "embed", "search", "merge")
# Seconds: searches take milliseconds, image queries tens to hundreds of them.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CREATED = "catalog_index_snapshot_created_timestamp_seconds"
AGE, AGE_HELP = "catalog_index_snapshot_age_seconds", "seconds since the live snapshot was built"
# Gauges that show one label set at a time (the live snapshot, the last refusal). A multiprocess
# gauge cannot drop a label set from its file: the old one is set to 0 and a scrape leaves it out.
ONE_LABEL_SET = ("catalog_index_snapshot_info", "catalog_index_refused_snapshot_info")
PER_WORKER = "liveall"                          # one series per live worker (label `pid`)


class ServiceMetrics:
    def __init__(self, across_workers: bool = False) -> None:
        self.multiprocess_dir: str | None = None
        if across_workers:  # one of several worker processes: values in files that every scrape merges
            self.multiprocess_dir = os.environ.get(MULTIPROC_ENV)
            if not self.multiprocess_dir or not os.path.isdir(self.multiprocess_dir) \
                    or not values.ValueClass._multiprocess:
                raise RuntimeError(f"--workers N needs {MULTIPROC_ENV} set to a directory before prometheus_client "
                                   "is imported: start the workers through `catalog-index serve` (run_server)")
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("catalog_index_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("catalog_index_request_seconds", "request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.steps = Histogram("catalog_index_step_seconds", "latency of one step of a search request",
                               ["endpoint", "step"], buckets=LATENCY_BUCKETS, registry=r)
        self.reloads = Counter("catalog_index_reloads", "snapshot reload attempts that found a new snapshot, "
                               "by outcome (loaded, refused: failed verification or loading; error: could "
                               "not resolve LATEST)", ["outcome"], registry=r)
        self.snapshot_info = Gauge("catalog_index_snapshot_info", "the live snapshot (value 1)",
                                   ["snapshot_id", "model_version"], registry=r, multiprocess_mode=PER_WORKER)
        self.snapshot_vectors = Gauge("catalog_index_snapshot_vectors", "vectors in the live snapshot", registry=r,
                                      multiprocess_mode=PER_WORKER)
        self.snapshot_created = Gauge(CREATED, "build time of the live snapshot (Unix time; 0: unknown)", registry=r,
                                      multiprocess_mode=PER_WORKER)
        self.snapshot_loaded = Gauge("catalog_index_snapshot_loaded_timestamp_seconds",
                                     "when this process started serving the live snapshot", registry=r,
                                     multiprocess_mode=PER_WORKER)
        self.refused = Gauge("catalog_index_refused_snapshot_info", "the last snapshot refused (value: Unix time "
                             "of the refusal)", ["snapshot_id", "reason"], registry=r, multiprocess_mode=PER_WORKER)
        self.last_reload_failure = Gauge("catalog_index_last_reload_failure_timestamp_seconds",
                                         "when the last reload was refused or failed (0: never)", registry=r,
                                         multiprocess_mode="max")
        r.register(_AgeCollector(self.snapshot_created))
        self._shown: dict[Gauge, tuple[str, ...]] = {}

    def _show_only(self, gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
        """Set `labels` to `value` on a gauge of ONE_LABEL_SET, dropping the label set shown before."""
        previous = self._shown.get(gauge)
        if self.multiprocess_dir is None:
            gauge.clear()
        elif previous is not None and previous != labels:
            gauge.labels(*previous).set(0)
        gauge.labels(*labels).set(value)
        self._shown[gauge] = labels

    def snapshot_loaded_now(self, snapshot_id: str, model_version: str, vectors: int, created_at: float | None) -> None:
        self._show_only(self.snapshot_info, (snapshot_id, model_version), 1)
        self.snapshot_vectors.set(vectors)
        self.snapshot_created.set(created_at or 0)
        self.snapshot_loaded.set(time.time())
        self.reloads.labels("loaded").inc()

    def snapshot_refused(self, snapshot_id: str, reason: str, outcome: str = "refused") -> None:
        self._show_only(self.refused, (snapshot_id or "unknown", reason), time.time())
        self.last_reload_failure.set(time.time())
        self.reloads.labels(outcome).inc()

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        forget_dead_workers(self.multiprocess_dir)
        registry = CollectorRegistry()
        registry.register(_WholeService(self.multiprocess_dir))
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def close(self) -> None:
        """This process stops serving: its per-worker series leave /metrics (its counts stay in the totals)."""
        if self.multiprocess_dir is not None:
            _mark_dead(os.getpid(), self.multiprocess_dir)


class _WholeService:
    """Every worker's files merged, less the label sets a worker stopped showing, plus the ages."""

    def __init__(self, path: str):
        self._merged = multiprocess.MultiProcessCollector(None, path)

    def collect(self):
        now = time.time()
        for family in self._merged.collect():
            if family.name in ONE_LABEL_SET:
                family.samples = [sample for sample in family.samples if sample.value != 0]
            yield family
            if family.name == CREATED:
                yield _age(family, now)


class _AgeCollector:
    """One process: the age of its live snapshot, from the build timestamp, at scrape time."""

    def __init__(self, created: Gauge):
        self._created = created

    def collect(self):
        yield from (_age(family, time.time()) for family in self._created.collect())


def _age(created: Metric, now: float) -> GaugeMetricFamily:
    """Seconds since each build timestamp of `created` (same labels; NaN where unknown)."""
    age = GaugeMetricFamily(AGE, AGE_HELP)
    for sample in created.samples:
        age.add_sample(AGE, sample.labels, now - sample.value if sample.value > 0 else float("nan"))
    return age


def forget_dead_workers(path: str) -> None:
    """Drop the per-worker series of workers that are gone (killed outright: no shutdown hook ran)."""
    pids = {Path(file).stem.rpartition("_")[2] for file in glob.glob(os.path.join(path, "gauge_live*_*.db"))}
    for pid in pids:
        if pid.isdigit() and not _running_sibling(int(pid)):
            _mark_dead(int(pid), path)


def _mark_dead(pid: int, path: str) -> None:
    try:
        multiprocess.mark_process_dead(pid, path)
    except FileNotFoundError:  # another worker's scrape removed it first
        pass


def _running_sibling(pid: int) -> bool:
    """Whether `pid` is a worker of this service still running: a child of our parent, not a zombie."""
    if pid == os.getpid():
        return True
    if not os.path.exists("/proc/self/stat"):  # no /proc (macOS): a signal 0 is all we can ask
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    try:
        state, parent = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:2]
    except (OSError, ValueError):
        return False
    return state not in ("Z", "X") and int(parent) == os.getppid()
