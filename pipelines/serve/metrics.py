"""Prometheus metrics of the search service: requests and latency per endpoint, latency per step
(fetch, decode, embed, search, merge), the live snapshot (id, model, age, vectors) and reloads.

One registry per app, not the process-global one, so that tests (and a process embedding two
apps) count separately. With `--workers N` each worker answers `/metrics` with its own counts
(a scrape reaches one worker); the `worker` label says which.
"""
from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STEPS = ("fetch", "decode", "embed", "search", "merge")
# Seconds: searches take milliseconds, image queries tens to hundreds of them.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        worker = str(os.getpid())
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
                                   ["snapshot_id", "model_version", "worker"], registry=r)
        self.snapshot_vectors = Gauge("catalog_index_snapshot_vectors", "vectors in the live snapshot", registry=r)
        self.snapshot_created = Gauge("catalog_index_snapshot_created_timestamp_seconds",
                                      "build time of the live snapshot (Unix time)", registry=r)
        self.snapshot_loaded = Gauge("catalog_index_snapshot_loaded_timestamp_seconds",
                                     "when this process started serving the live snapshot", registry=r)
        self.snapshot_age = Gauge("catalog_index_snapshot_age_seconds", "seconds since the live snapshot was built",
                                  registry=r)
        self.snapshot_age.set_function(self._age)
        self.refused = Gauge("catalog_index_refused_snapshot_info", "the last snapshot refused (value: Unix time "
                             "of the refusal)", ["snapshot_id", "reason"], registry=r)
        self.last_reload_failure = Gauge("catalog_index_last_reload_failure_timestamp_seconds",
                                         "when the last reload was refused or failed (0: never)", registry=r)
        self.worker = worker
        self._created_at: float | None = None

    def _age(self) -> float:
        return time.time() - self._created_at if self._created_at else float("nan")

    def snapshot_loaded_now(self, snapshot_id: str, model_version: str, vectors: int, created_at: float | None) -> None:
        self.snapshot_info.clear()
        self.snapshot_info.labels(snapshot_id, model_version, self.worker).set(1)
        self.snapshot_vectors.set(vectors)
        self._created_at = created_at
        if created_at:
            self.snapshot_created.set(created_at)
        self.snapshot_loaded.set(time.time())
        self.reloads.labels("loaded").inc()

    def snapshot_refused(self, snapshot_id: str, reason: str, outcome: str = "refused") -> None:
        self.refused.clear()
        self.refused.labels(snapshot_id or "unknown", reason).set(time.time())
        self.last_reload_failure.set(time.time())
        self.reloads.labels(outcome).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
