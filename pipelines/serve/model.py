"""Query images -> vectors with a snapshot's own model: decode (with the service's pixel cap),
then embed, batching requests that arrive together into one model call.

One `QueryModel` per model version: a snapshot swap that changes the model version builds (and
warms) the new one before the swap, so the first request after it pays no loading. The model
runs on `threads` runner threads; each takes every waiting image (up to `max_batch`) at once.
Several runners because one alone leaves the cores idle between batches: with a few clients in
lockstep, the next images are still being decoded while a batch runs, then the batch waits for
them (bench/serve, 4 clients on 2 cores: 0.78 of the minimal server's queries/s with one runner,
0.93 with four). Batches because under a pile-up one call over many images beats as many calls
(16 clients: 1.24). This module must never decode without the pixel cap, and never embed with
a model other than the snapshot's.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from pipelines.client import model_spec_from_manifest


class QueryModel:
    """The model of one snapshot's model version, ready to embed query images."""

    def __init__(self, model_info: dict, snapshot_dir: Path, device: str = "cpu", max_batch: int = 16,
                 max_pixels: int = 50_000_000, threads: int | None = None):
        """`threads`: runner threads (default: 4 on a CPU, 2 on a GPU, where one batch at a time
        runs and the second overlaps its host-side work)."""
        # torch: kept out of import time (the page, /metrics and vector queries never need it)
        from pipelines.embed import get_embedder

        self.spec = model_spec_from_manifest(model_info, snapshot_dir)  # SnapshotError: vectors only
        self.version = model_info["version"]
        self.max_pixels = max_pixels
        self.max_batch = max_batch
        self.embedder = get_embedder(self.spec, device)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread_lock = threading.Lock()
        self.threads = threads or default_embed_threads(device)
        self._runners: list[threading.Thread] = []
        blank = np.full((1, self.spec.preprocessing.crop, self.spec.preprocessing.crop, 3), 255, dtype=np.uint8)
        self.embed_blocking(blank[0])  # loads the weights' pages and warms the kernels before any request

    def decode(self, data: bytes) -> np.ndarray:
        """Bytes -> model input pixels; ImageDecodeError (reason code) for anything unusable."""
        # torch: kept out of import time (decode_for_model lives beside the model code)
        from pipelines.embed import decode_for_model

        return decode_for_model(data, self.spec.preprocessing, max_pixels=self.max_pixels)

    def _submit(self, pixels: np.ndarray) -> Future:
        future: Future = Future()
        self._queue.put((pixels, future))
        with self._thread_lock:  # (re)start the runners: a closed model still answers late requests
            self._runners = [t for t in self._runners if t.is_alive()]
            while len(self._runners) < self.threads:
                runner = threading.Thread(target=self._run, name=f"embed-{self.version[:12]}", daemon=True)
                self._runners.append(runner)
                runner.start()
        return future

    def embed_blocking(self, pixels: np.ndarray) -> np.ndarray:
        return self._submit(pixels).result()

    async def embed(self, pixels: np.ndarray) -> np.ndarray:
        """One (crop, crop, 3) image -> its vector, batched with whatever else is waiting."""
        return await asyncio.wrap_future(self._submit(pixels))

    def close(self) -> None:
        """Let the model thread end once idle (a swap away from this model version)."""
        self._closed = True

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:
                with self._thread_lock:
                    if self._closed and self._queue.empty():
                        if threading.current_thread() in self._runners:
                            self._runners.remove(threading.current_thread())
                        return
                continue
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                vectors = self.embedder.embed_pixels(np.stack([pixels for pixels, _ in batch]))
            except Exception as exc:  # surfaced to each waiting request, never kills the thread
                for _, future in batch:
                    future.set_exception(exc)
                continue
            for (_, future), vector in zip(batch, vectors):
                future.set_result(np.asarray(vector, dtype=np.float32))


def default_embed_threads(device: str) -> int:
    return 4 if device == "cpu" else 2


def timed(timings: dict[str, float], step: str, started: float) -> float:
    """Add the seconds since `started` to `timings[step]`; return now (the next step's start)."""
    now = time.perf_counter()
    timings[step] = timings.get(step, 0.0) + now - started
    return now
