"""Embed stage: the canonical images of a dedup run -> the embeddings cache, on Spark.

The cache `embeddings/<model_version>/` holds one vector per image sha256 per model
version, so a nightly run embeds only images no earlier run embedded with the same
version; changing the model, its preprocessing, pooling or PCA changes the version and
re-embeds everything, on purpose.

Each Spark task embeds one slice of images: it reads their bytes from the images table,
picks its device from the task's GPU resources (`TaskContext.resources()`; CPU when it
has none), runs the process-wide model (loaded once per executor Python worker), and
writes its own part file plus the images it could not decode to quarantine. With
`embed.task_gpus > 0` the stage asks Spark for GPUs through a stage-level resource
profile, so only this stage holds them.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines import layout
from pipelines.config import EmbedSettings, S3Settings, Settings
from pipelines.dedup import with_valid_canonicals
from pipelines.errors import StageRefused
from pipelines.readers import (  # noqa: F401
    failed_shas,
    quarantined_sha256s,
    read_current_images,
    read_dedup_images,
    read_embeddings,
)
from pipelines.spark import run_tasks, task_resources
from pipelines.storage import Storage, open_storage
from schemas.tables import EMBEDDINGS, QUARANTINE


class EmbedError(StageRefused):
    pass




def spec_from_settings(cfg: EmbedSettings, storage: Storage | None = None):
    """The model spec the settings describe. With `pca_dim`, the PCA fitted on the catalog
    (`models/pca/…`, see fit_catalog_pca) is part of the spec, so it needs the warehouse."""
    # torch: kept out of import time
    from pipelines.embed.model import PcaProjection, Preprocessing, default_spec

    base = default_spec(pooling=cfg.pooling, preprocessing=Preprocessing(framing=cfg.framing))
    if not cfg.pca_dim:
        return base
    if storage is None or not storage.exists(pca_key(base, cfg)):
        raise EmbedError(f"embed.pca_dim={cfg.pca_dim} but no PCA has been fitted for this model yet: "
                         "run `catalog-index embed` with the same settings first")
    return replace(base, pca=PcaProjection.from_bytes(storage.read_bytes(pca_key(base, cfg))))


def pca_key(base_spec, cfg: EmbedSettings) -> str:
    # torch: kept out of import time
    from pipelines.embed.model import model_version

    return layout.pca_key(model_version(base_spec), cfg.pca_dim, cfg.pca_whiten)


def fit_catalog_pca(storage: Storage, base_spec, cfg: EmbedSettings, canonical: list[str]):
    """The catalog's PCA: fitted once on the full-dimension vectors of the canonical images,
    then kept (delete models/pca/<key> to refit), so the model version stays stable night to night."""
    # torch: kept out of import time
    from pipelines.embed.embedder import fit_pca
    from pipelines.embed.model import PcaProjection, model_version

    key = pca_key(base_spec, cfg)
    if storage.exists(key):
        return PcaProjection.from_bytes(storage.read_bytes(key))
    vectors = read_embeddings(storage, model_version(base_spec))
    vectors = vectors[vectors["sha256"].isin(set(canonical))].sort_values("sha256")
    if len(vectors) <= cfg.pca_dim:
        raise EmbedError(f"embed.pca_dim={cfg.pca_dim} needs more than {cfg.pca_dim} embedded images to fit "
                         f"(have {len(vectors)}); lower pca_dim or leave it unset")
    pca = fit_pca(np.stack(vectors["vector"].to_numpy()), cfg.pca_dim, whiten=cfg.pca_whiten)
    storage.write_bytes(key, pca.to_bytes())
    return pca


def _project_with_pca(storage: Storage, run_id: str, base_spec, cfg: EmbedSettings, canonical: list[str]) -> tuple[str, int]:
    """Write PCA-projected vectors for canonical images the PCA version lacks; returns (version, written)."""
    # torch: kept out of import time
    from pipelines.embed.embedder import apply_pca
    from pipelines.embed.model import model_version

    pca = fit_catalog_pca(storage, base_spec, cfg, canonical)
    version = model_version(replace(base_spec, pca=pca))
    have = set(read_embeddings(storage, version, columns=["sha256"])["sha256"])
    full = read_embeddings(storage, model_version(base_spec))
    full = full[full["sha256"].isin(set(canonical) - have)].sort_values("sha256")
    if len(full):
        projected = apply_pca(np.stack(full["vector"].to_numpy()), pca)
        now = pd.Timestamp(datetime.now(timezone.utc))
        digest = hashlib.sha256("".join(full["sha256"]).encode()).hexdigest()[:12]
        storage.write_table(f"{layout.embeddings_prefix(version)}part-{run_id}-pca-{digest}.parquet", pa.table({
            "sha256": pa.array(full["sha256"].tolist(), pa.string()),
            "vector": pa.array(list(projected.astype(np.float32)), pa.list_(pa.float32())),
            "model_version": pa.array([version] * len(full), pa.string()),
            "run_id": pa.array([run_id] * len(full), pa.string()),
            "embedded_at": pa.array([now] * len(full), EMBEDDINGS.field("embedded_at").type)}, schema=EMBEDDINGS))
    return version, len(full)


@dataclass
class EmbedTask:
    warehouse: str
    s3: S3Settings
    run_id: str
    part: str
    embed: EmbedSettings
    locations: dict[str, list[str]]  # stored_key -> sha256s to embed from it


@dataclass
class EmbedSummary:
    run_id: str
    model_version: str
    device: str
    canonical_images: int = 0
    excluded_by_validation: int = 0
    embedded: int = 0
    reused: int = 0
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    embed_s: float = 0.0
    images_per_s: float = 0.0
    pca_projected: int = 0
    elapsed_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def task_device(resource_name: str = "gpu"):
    """The device this Spark task was given: its GPU address, or the CPU."""
    # torch: kept out of import time
    from pipelines.embed.model import choose_device

    return choose_device(task_resources(), resource_name)


def embed_task(task: EmbedTask) -> dict:
    # torch: kept out of import time
    from pipelines.embed.embedder import get_embedder

    storage = open_storage(task.warehouse, task.s3)
    spec = spec_from_settings(task.embed.model_copy(update={"pca_dim": None}))  # PCA is applied on the driver
    device = task_device()
    embedder = get_embedder(spec, device, batch_size=task.embed.batch_size, vector_dtype="float32")

    def frames():
        for key, shas in sorted(task.locations.items()):
            wanted = set(shas)
            part = storage.read_parquet_file(key, columns=["sha256", "image"]).to_pandas()
            part = part[part["sha256"].isin(wanted)].drop_duplicates("sha256")
            for start in range(0, len(part), 256):
                yield part.iloc[start:start + 256]

    started = time.monotonic()
    vectors, failures = [], []
    for batch in embedder.embed_frames(frames()):
        vectors.append(batch.embeddings)
        failures.append(batch.failures)
    seconds = time.monotonic() - started
    done = pd.concat(vectors, ignore_index=True) if vectors else pd.DataFrame(columns=["sha256", "vector"])
    failed = pd.concat(failures, ignore_index=True) if failures else pd.DataFrame(columns=["sha256", "reason", "detail"])
    now = pd.Timestamp(datetime.now(timezone.utc))
    table = pa.table({
        "sha256": pa.array(done["sha256"].tolist(), pa.string()),
        "vector": pa.array([np.asarray(v, dtype=np.float32) for v in done["vector"]], pa.list_(pa.float32())),
        "model_version": pa.array([embedder.version] * len(done), pa.string()),
        "run_id": pa.array([task.run_id] * len(done), pa.string()),
        "embedded_at": pa.array([now] * len(done), EMBEDDINGS.field("embedded_at").type),
    }, schema=EMBEDDINGS)
    storage.write_table(f"{layout.embeddings_prefix(embedder.version)}part-{task.run_id}-{task.part}.parquet", table)
    quarantine = [{"run_id": task.run_id, "stage": "embed", "reason": r.reason, "detail": r.detail,
                   "sha256": r.sha256, "at": now} for r in failed.itertuples()]
    storage.write_table(f"{layout.quarantine_prefix(task.run_id, 'embed')}part-{task.part}.parquet",
                        pa.Table.from_pylist(quarantine, QUARANTINE))
    return {"embedded": len(done), "failed": dict(Counter(failed["reason"])), "seconds": seconds,
            "device": str(device), "version": embedder.version}


def run_embed(settings: Settings, run_id: str, *, runner: str = "spark", spark=None) -> EmbedSummary:
    # torch: kept out of import time
    from pipelines.embed.model import model_version

    started = time.monotonic()
    storage = open_storage(settings.warehouse, settings.s3)
    base_spec = spec_from_settings(settings.embed.model_copy(update={"pca_dim": None}))
    version = model_version(base_spec)
    dedup = read_dedup_images(storage, run_id)

    # Images the validate stage quarantined (too small, odd aspect ratio...) are not embedded;
    # a cluster whose canonical image was rejected is represented by its best valid member.
    rejected = quarantined_sha256s(storage, run_id, "images")
    canonical = sorted(set(with_valid_canonicals(dedup, rejected)["canonical_sha256"]))
    summary = EmbedSummary(run_id=run_id, model_version=version, device="cpu", canonical_images=len(canonical),
                           excluded_by_validation=len(set(dedup["canonical_sha256"]) & rejected))
    # Finished parts of a killed or repeated run stay: their vectors are valid cache entries,
    # so a rerun resumes where it stopped. Quarantine is recomputed for what is left.
    storage.delete_prefix(layout.quarantine_prefix(run_id, "embed"))

    cached = set(read_embeddings(storage, version, columns=["sha256"])["sha256"])
    todo = [sha for sha in canonical if sha not in cached]
    summary.reused = len(canonical) - len(todo)
    if todo:
        locations = (read_current_images(storage, run_id)[["sha256", "stored_key"]]
                     .drop_duplicates("sha256").set_index("sha256")["stored_key"])
        per_task = settings.embed.images_per_task
        tasks = []
        for start in range(0, len(todo), per_task):
            chunk: dict[str, list[str]] = {}
            for sha in todo[start:start + per_task]:
                chunk.setdefault(locations[sha], []).append(sha)
            # Named by content: a resumed run's new tasks never overwrite parts that finished.
            digest = hashlib.sha256("".join(todo[start:start + per_task]).encode()).hexdigest()[:12]
            tasks.append(EmbedTask(settings.warehouse, settings.s3, run_id, digest, settings.embed, chunk))

        results = run_tasks(embed_task, tasks, runner=runner, spark=spark, description="embed",
                            job_group=f"embed-{run_id}", task_gpus=settings.embed.task_gpus)
        for result in results:
            summary.embedded += result["embedded"]
            for reason, count in result["failed"].items():
                summary.quarantine_reasons[reason] = summary.quarantine_reasons.get(reason, 0) + count
            summary.embed_s += result["seconds"]
            summary.device = result["device"]
        summary.quarantined = sum(summary.quarantine_reasons.values())
        summary.images_per_s = round(summary.embedded / summary.embed_s, 1) if summary.embed_s else 0.0
    summary.embed_s = round(summary.embed_s, 3)
    if settings.embed.pca_dim:
        summary.model_version, summary.pca_projected = _project_with_pca(
            storage, run_id, base_spec, settings.embed, [sha for sha in canonical if sha not in failed_shas(storage, run_id)])
    summary.elapsed_s = round(time.monotonic() - started, 3)
    if summary.reused + summary.embedded + summary.quarantined != summary.canonical_images:
        raise EmbedError(f"accounting mismatch in embed {run_id}: {summary.reused} reused + {summary.embedded} "
                         f"embedded + {summary.quarantined} quarantined != {summary.canonical_images} canonical images")
    storage.write_text(layout.embed_success_key(run_id), summary.to_json())
    return summary
