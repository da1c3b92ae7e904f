"""Helpers for the serving tests: real-model snapshots of sample images, and a real uvicorn server.

`RealCatalog` embeds a few openclipart PNGs per category once with the real EfficientNet-Lite0
model (or a PCA'd version of it: another model version), writes them into a warehouse as the
embed stage would, and `publish()` builds and publishes a snapshot with the real build code.
`Service` runs `pipelines.serve.create_app` under a real uvicorn server on a free 127.0.0.1 port
in a thread; tests talk to it over HTTP.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import requests

from pipelines.client import pull
from pipelines.config import IndexSettings, load_settings
from pipelines.index import build_index
from pipelines.layout import dedup_images_key, embeddings_prefix
from pipelines.publish import publish_snapshot
from pipelines.storage import open_storage
from schemas.tables import DEDUP_IMAGES, EMBEDDINGS

OPENCLIPART = Path("/usr/share/openclipart/png")
CATEGORIES = ("food", "tools", "transportation", "electronics")
CFG = IndexSettings(recall_queries=10, reuse_unchanged_shards=False)


def sample_images(per_category: int = 5, categories=CATEGORIES) -> list[tuple[str, str, Path]]:
    """(product_id, category, path) of the first PNGs of each category folder."""
    out = []
    for category in categories:
        for number, path in enumerate(sorted((OPENCLIPART / category).glob("*.png"))[:per_category]):
            out.append((f"{category}-{number:03d}", category, path))
    return out


class RealCatalog:
    def __init__(self, root: Path, per_category: int = 5):
        from pipelines.embed import default_spec, get_embedder

        self.images = sample_images(per_category)
        self.spec = default_spec()
        self.uri = (root / "warehouse").as_uri()
        self.storage = open_storage(self.uri)
        self.settings = load_settings(warehouse=self.uri)
        embedder = get_embedder(self.spec, "cpu")
        items = [(f"{i:064x}", path.read_bytes()) for i, (_, _, path) in enumerate(self.images)]
        self.features = {}
        for batch in embedder.embed_images(items):
            self.features.update(zip(batch.embeddings["sha256"], batch.embeddings["vector"]))
        rows = [{"product_id": product, "category": category, "image_url": path.as_uri(), "title": path.stem,
                 "sha256": f"{i:064x}", "cluster_id": f"{i:064x}", "canonical_sha256": f"{i:064x}",
                 "is_canonical": True, "duplicate_kind": "none", "run_id": "r1"}
                for i, (product, category, path) in enumerate(self.images)]
        self.storage.write_table(dedup_images_key("r1"), pa.Table.from_pylist(rows, schema=DEDUP_IMAGES))
        self._write_embeddings(self.spec, self.features)

    def _write_embeddings(self, spec, vectors: dict) -> None:
        from pipelines.embed import model_version

        version = model_version(spec)
        self.storage.write_table(f"{embeddings_prefix(version)}part-00000.parquet", pa.Table.from_pylist(
            [{"sha256": sha, "vector": [float(v) for v in vector], "model_version": version, "run_id": "r1"}
             for sha, vector in vectors.items()], schema=EMBEDDINGS))

    def pca_spec(self, dim: int = 8):
        """The same network with a PCA projection: another model version, with vectors of `dim` dims."""
        import numpy as np

        from pipelines.embed.embedder import apply_pca, fit_pca

        features = np.stack([self.features[k] for k in sorted(self.features)])
        pca = fit_pca(features, dim)
        spec = replace(self.spec, pca=pca)
        self._write_embeddings(spec, {k: apply_pca(np.asarray(v)[None, :], pca)[0]
                                      for k, v in self.features.items()})
        return spec

    def publish(self, spec=None) -> dict:
        built = build_index(self.settings, "r1", model=spec or self.spec, cfg=CFG, runner="local")
        return publish_snapshot(self.storage, "catalog", snapshot_id=built.snapshot_id).manifest


def pulled_catalog(root: Path) -> RealCatalog:
    """A RealCatalog whose first snapshot (`.first`, its manifest) is published and pulled into `.dest`."""
    catalog = RealCatalog(root)
    catalog.first = catalog.publish()
    catalog.dest = root / "serving"
    pull(catalog.uri, catalog.dest)
    return catalog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`create_app(settings)` under a real uvicorn server on 127.0.0.1, in a thread."""

    def __init__(self, settings):
        import uvicorn

        from pipelines.serve import create_app

        self.app = create_app(settings)
        self.port = settings.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_keep_alive=5, limit_concurrency=512)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Service":
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # Watched in-process, not by polling /healthz: a poll before the first snapshot is loaded
            # is a 503 the service rightly counts, and tests assert that /metrics shows no 5xx.
            if self.server.started and self.app.state.live.current is not None:
                return self
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("the service did not report healthy within 60 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def metric(self, name: str, headers: dict | None = None, **labels) -> float:
        """The value of one sample of /metrics (0.0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(self.url + "/metrics", headers=headers or {}, timeout=5).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total
