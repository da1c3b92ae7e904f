"""The live snapshot: load it, follow `LATEST` (or `current`), swap between requests, refuse bad ones.

Every `refresh_s` (and on `POST /v1/reload`) `LiveSnapshot.check()` resolves what should be live:

* `--warehouse W`: `pull` into the local cache (`LATEST` -> download -> verify every sha256 ->
  atomic `current` swap); a snapshot that fails verification is refused by `pull` itself and is
  not downloaded again until `LATEST` changes.
* `--snapshot-dir DIR`: `DIR/current` (whoever pulls into DIR), or DIR itself when it is one
  snapshot directory. A directory that `pull` did not mark verified for exactly its manifest is
  hashed file by file before use.

A new snapshot is opened beside the live one (memory-mapped: two coexist without a second copy
in RAM), its model version's model is loaded and warmed, one search is run on it, and only then
is the reference swapped (one attribute assignment: a request reads it once and finishes on the
snapshot it started with). Any failure keeps the old snapshot serving and is counted in
/metrics. This module must never serve a snapshot that failed verification or loading.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from pipelines.client import InsufficientSpace, pull
from pipelines.search import OpenSnapshot, SnapshotError
from pipelines.errors import CatalogIndexError
from pipelines.serve.metrics import ServiceMetrics
from pipelines.serve.model import QueryModel
from pipelines.serve.settings import ServeSettings
from pipelines.snapshot import MANIFEST_FILE, SnapshotVerificationError, read_latest
from pipelines.storage import open_storage

log = logging.getLogger("catalog_index.serve")


@dataclass
class Loaded:
    """A snapshot ready to answer: opened, verified, with its model (None: searchable by vector only)."""
    snapshot: OpenSnapshot
    model: QueryModel | None
    model_error: str | None
    loaded_at: float = field(default_factory=time.time)

    @property
    def created_at(self) -> float | None:
        try:
            return datetime.fromisoformat(self.snapshot.manifest["created_at"]).timestamp()
        except (KeyError, ValueError):
            return None


@dataclass
class ReloadOutcome:
    outcome: str                 # loaded | unchanged | refused | error
    snapshot_id: str | None
    detail: str = ""

    def to_json(self) -> dict:
        return {"outcome": self.outcome, "snapshot_id": self.snapshot_id, "detail": self.detail}


class LiveSnapshot:
    def __init__(self, settings: ServeSettings, metrics: ServiceMetrics):
        self.settings = settings
        self.metrics = metrics
        self.current: Loaded | None = None
        self.last_outcome: ReloadOutcome | None = None
        self._models: dict[str, QueryModel] = {}
        self._refused: dict[str, str] = {}       # what was refused (LATEST pointer or manifest digest) -> why
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.first_check_done = threading.Event()  # the follower's first check ended (whatever its outcome)

    # -- following ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="snapshot-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _follow(self) -> None:
        while not self._stop.is_set():
            self.check()
            self.first_check_done.set()
            self._stop.wait(self.settings.refresh_s if self.current else min(self.settings.refresh_s, 2.0))

    def check(self) -> ReloadOutcome:
        """Resolve what should be live and, when it changed, load it and swap; never raises."""
        with self._reload_lock:
            try:
                outcome = self._check()
            except Exception as exc:  # a follower must survive anything a warehouse or a disk does
                log.exception("snapshot reload failed")
                outcome = ReloadOutcome("error", None, f"{type(exc).__name__}: {exc}")
                self.metrics.snapshot_refused("", "error", outcome="error")
            self.last_outcome = outcome
            if outcome.outcome in ("refused", "error"):
                log.warning("snapshot %s %s: %s", outcome.snapshot_id, outcome.outcome, outcome.detail)
            elif outcome.outcome == "loaded":
                log.info("serving snapshot %s", outcome.snapshot_id)
            return outcome

    def _check(self) -> ReloadOutcome:
        settings = self.settings
        if settings.warehouse:
            storage = open_storage(settings.warehouse, settings.s3_settings)
            pointer = read_latest(storage, settings.index_name)
            if pointer is None:
                return ReloadOutcome("error", None, f"index {settings.index_name!r} has no LATEST in "
                                                    f"{settings.warehouse}: nothing published yet")
            key = f"{pointer['snapshot_id']}:{pointer.get('manifest_sha256')}"
            if key in self._refused:
                return ReloadOutcome("refused", pointer["snapshot_id"], self._refused[key])
            try:
                pulled = pull(settings.warehouse, settings.pull_dir, s3=settings.s3_settings,
                              index_name=settings.index_name)
            except SnapshotVerificationError as exc:
                self._refused[key] = str(exc)
                self.metrics.snapshot_refused(pointer["snapshot_id"], "verification")
                return ReloadOutcome("refused", pointer["snapshot_id"], str(exc))
            except InsufficientSpace as exc:  # not remembered: the next check tries again once space is freed
                self.metrics.snapshot_refused(pointer["snapshot_id"], "disk_space")
                return ReloadOutcome("refused", pointer["snapshot_id"], str(exc))
            root = pulled.path
        else:
            base = Path(settings.snapshot_dir).expanduser()
            if (base / MANIFEST_FILE).is_file():
                root = base
            elif (base / "current").exists():
                root = (base / "current").resolve()
            else:
                return ReloadOutcome("error", None, f"{base} holds no manifest.json and no 'current' snapshot")
        root = root.resolve()
        if self.current is not None and self.current.snapshot.root.resolve() == root:
            return ReloadOutcome("unchanged", self.current.snapshot.snapshot_id)
        try:
            digest = hashlib.sha256((root / MANIFEST_FILE).read_bytes()).hexdigest()
        except OSError as exc:
            return ReloadOutcome("error", root.name, f"cannot read {root / MANIFEST_FILE}: {exc}")
        if digest in self._refused:
            return ReloadOutcome("refused", root.name, self._refused[digest])
        try:
            loaded = self._load(root)
        except (CatalogIndexError, OSError, RuntimeError, ValueError) as exc:
            reason = "verification" if isinstance(exc, SnapshotVerificationError) else "load"
            self._refused[digest] = f"{type(exc).__name__}: {exc}"
            self.metrics.snapshot_refused(root.name, reason)
            return ReloadOutcome("refused", root.name, self._refused[digest])
        previous = self.current
        self.current = loaded  # the swap: requests that already hold `previous` finish on it
        snapshot = loaded.snapshot
        self.metrics.snapshot_loaded_now(snapshot.snapshot_id, snapshot.model_version,
                                         snapshot.manifest["totals"]["vectors"], loaded.created_at)
        if previous is not None and previous.model is not None and previous.model is not loaded.model:
            self._models.pop(previous.model.version, None)
            previous.model.close()
        return ReloadOutcome("loaded", snapshot.snapshot_id,
                             f"was {previous.snapshot.snapshot_id}" if previous else "first snapshot")

    def _load(self, root: Path) -> Loaded:
        snapshot = OpenSnapshot(root, verify=None, mmap=True)  # hashes unless pull verified this manifest
        model, model_error = None, None
        version = snapshot.model_version
        try:
            model = self._models.get(version) or QueryModel(snapshot.manifest["model"], root, self.settings.device,
                                                            self.settings.max_batch, self.settings.max_pixels,
                                                            self.settings.embed_threads)
            self._models[version] = model
        except SnapshotError as exc:  # vectors from a model this installation cannot run: vector search only
            model_error = str(exc)
        # One real search before the swap: a snapshot that opens but cannot answer is refused here.
        shard = snapshot.shards[0]
        probe = shard.vector_of_row(0) if len(shard.vector_ids) else np.ones(snapshot.dimension, np.float32)
        if not snapshot.search_vectors(probe, k=1)[0]:
            raise SnapshotError(f"snapshot {snapshot.snapshot_id} answered a search for its own vector with nothing")
        return Loaded(snapshot, model, model_error)
