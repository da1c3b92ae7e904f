"""Embed stage on real Spark: one vector per canonical image, cached by (sha256, model version)."""
import numpy as np
import pyarrow as pa
import pytest

from pipelines.crawl.stage import run_crawl
from pipelines.dedup.stage import read_dedup_images, run_dedup
from pipelines.embed.stage import read_embeddings, run_embed, task_device
from pipelines.storage import open_storage
from test_crawl import settings_for, write_manifest
from test_dedup_stage import planted  # noqa: F401 - fixture

pytestmark = pytest.mark.spark


def test_embeds_canonical_images_once(spark, planted, tmp_path):  # noqa: F811
    warehouse = (tmp_path / "wh").as_uri()
    settings = settings_for(warehouse)
    run_crawl(settings, write_manifest(tmp_path / "m.csv", planted), "r1", spark=spark)
    run_dedup(settings, "r1", spark=spark)
    first = run_embed(settings, "r1", spark=spark)

    storage = open_storage(warehouse)
    canonical = set(read_dedup_images(storage, "r1")["canonical_sha256"])
    assert first.canonical_images == len(canonical) == first.embedded and first.reused == 0
    vectors = read_embeddings(storage, first.model_version)
    assert set(vectors["sha256"]) == canonical
    matrix = np.stack(vectors["vector"].to_numpy())
    assert matrix.shape == (len(canonical), 1280)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4) and np.isfinite(matrix).all()

    again = run_embed(settings, "r1", spark=spark)           # rerun of the same night: resumes, nothing to do
    assert (again.embedded, again.reused) == (0, len(canonical))
    run_crawl(settings, write_manifest(tmp_path / "m.csv", planted), "r2", spark=spark)
    run_dedup(settings, "r2", spark=spark)
    second = run_embed(settings, "r2", spark=spark)          # next night, nothing new
    assert (second.embedded, second.reused) == (0, len(canonical))

    avg = settings.model_copy(update={"embed": settings.embed.model_copy(update={"pooling": "avg"})})
    other = run_embed(avg, "r2", spark=spark)                # another model version re-embeds, on purpose
    assert other.model_version != first.model_version and other.embedded == len(canonical)

    with_pca = settings.model_copy(update={"embed": settings.embed.model_copy(update={"pca_dim": 3})})
    projected = run_embed(with_pca, "r2", spark=spark)      # fitted on the cached vectors, no re-embedding
    assert (projected.embedded, projected.pca_projected) == (0, len(canonical))
    assert projected.model_version not in (first.model_version, other.model_version)
    small = np.stack(read_embeddings(storage, projected.model_version)["vector"].to_numpy())
    assert small.shape == (len(canonical), 3) and np.allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-5)
    from pipelines.embed.stage import spec_from_settings
    from pipelines.embed.model import model_version
    assert model_version(spec_from_settings(with_pca.embed, storage)) == projected.model_version
    assert run_embed(with_pca, "r2", spark=spark).pca_projected == 0  # same PCA next time: nothing to do


def test_undecodable_canonical_image_is_quarantined(spark, planted, tmp_path):  # noqa: F811
    warehouse = (tmp_path / "wh").as_uri()
    settings = settings_for(warehouse)
    run_crawl(settings, write_manifest(tmp_path / "m.csv", planted), "r1", spark=spark)
    run_dedup(settings, "r1", spark=spark)
    storage = open_storage(warehouse)
    key = next(k for k in storage.list("images/category=tools/"))
    part = storage.read_parquet_file(key)
    data = part.to_pydict()
    data["image"][0] = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40  # bit rot after dedup
    storage.write_table(key, pa.Table.from_pydict(data, schema=part.schema))
    summary = run_embed(settings, "r1", spark=spark)
    assert summary.quarantined == 1 and summary.embedded == summary.canonical_images - 1
    quarantine = storage.read_table("quarantine/r1/embed/").to_pandas()
    assert list(quarantine["stage"]) == ["embed"] and quarantine.loc[0, "sha256"] == data["sha256"][0]


def test_task_device_follows_spark_task_resources(monkeypatch):
    import torch
    from pyspark import TaskContext

    class Gpu:
        addresses = ["1"]

    class FakeContext:
        def resources(self):
            return {"gpu": Gpu()}

    monkeypatch.setattr(TaskContext, "get", staticmethod(lambda: FakeContext()))
    assert task_device() == torch.device("cpu")  # this machine has no CUDA: the CPU, not a crash
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert task_device() == torch.device("cuda:1")
    monkeypatch.setattr(TaskContext, "get", staticmethod(lambda: None))
    assert task_device() == torch.device("cpu")  # no GPU given to the task: CPU even if CUDA exists
