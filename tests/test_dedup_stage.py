"""Dedup stage end to end on real Spark: clusters, canonical rule, no product lost, incremental."""
import io
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from pipelines.crawl.stage import run_crawl
from pipelines.dedup.stage import read_dedup_images, run_dedup
from pipelines.storage import open_storage
from test_crawl import settings_for, write_manifest

pytestmark = pytest.mark.spark

SOURCE = Path("/usr/share/openclipart/png")


def drawing(name: str, scale: float = 1.0, fmt: str = "PNG", quality: int = 90) -> bytes:
    image = Image.open(SOURCE / name).convert("RGBA")
    canvas = Image.new("RGB", image.size, "white")
    canvas.paste(image, mask=image.split()[3])
    if scale != 1.0:
        canvas = canvas.resize((max(1, int(canvas.width * scale)), max(1, int(canvas.height * scale))), Image.LANCZOS)
    buf = io.BytesIO()
    canvas.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def distinct(i: int) -> bytes:
    """Clearly different synthetic images (shapes at different places)."""
    image = Image.new("RGB", (160, 120), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((10 + 13 * i, 10 + 7 * i, 60 + 11 * i, 90), fill=((50 * i) % 256, 120, 200 - 20 * i))
    draw.ellipse((90 - 5 * i, 20, 150, 60 + 5 * i), fill=(200, (70 * i) % 256, 40))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def planted(fault_server, tmp_path):
    apple = "food/apple_bitten_dan_gerhard_01.png"
    original, half = drawing(apple), drawing(apple, 0.5, "JPEG", 85)
    put = fault_server.put
    rows = [("orig", "food", put("orig.png", original), "original"),
            ("copy", "food", put("orig-copy.png", original), "same bytes elsewhere"),   # exact duplicate
            ("a-small", "food", put("half.jpg", half), "resized + recompressed"),        # near duplicate
            ] + [(f"d{i}", "tools", put(f"d{i}.png", distinct(i)), "") for i in range(5)]
    return rows


def test_clusters_canonical_and_accounting(spark, planted, tmp_path):
    warehouse = (tmp_path / "wh").as_uri()
    settings = settings_for(warehouse)
    run_crawl(settings, write_manifest(tmp_path / "m.csv", planted), "r1", spark=spark)
    summary = run_dedup(settings, "r1", spark=spark)

    assert summary.image_rows == 8 and summary.accounted == 8
    assert (summary.exact_duplicate_rows, summary.near_duplicate_rows) == (1, 1)
    assert summary.clusters == 6 and summary.unique_images == 7
    rows = read_dedup_images(open_storage(warehouse), "r1").set_index("product_id")
    assert len(rows) == 8  # no product disappears
    canonical = rows.loc["orig", "canonical_sha256"]
    assert rows.loc["orig", "is_canonical"] and rows.loc["copy", "sha256"] == canonical
    assert rows.loc["a-small", "canonical_sha256"] == canonical            # largest resolution wins
    assert rows.loc["a-small", "duplicate_kind"] == "near" and not rows.loc["a-small", "is_canonical"]
    assert {rows.loc["orig", "duplicate_kind"], rows.loc["copy", "duplicate_kind"]} == {"none", "exact"}
    for pid in [f"d{i}" for i in range(5)]:
        assert rows.loc[pid, "is_canonical"] and rows.loc[pid, "duplicate_kind"] == "none"
    pairs = open_storage(warehouse).read_table("dedup/r1/pairs.parquet").to_pandas()
    assert pairs["confirmed"].sum() == 1 and pairs["confirmation_score"].notna().all()


def test_incremental_dedup_searches_only_new_images(spark, planted, fault_server, tmp_path):
    warehouse = (tmp_path / "wh").as_uri()
    settings = settings_for(warehouse)
    run_crawl(settings, write_manifest(tmp_path / "m1.csv", planted), "r1", spark=spark)
    first = run_dedup(settings, "r1", spark=spark)
    night2 = planted + [("new", "tools", fault_server.put("d0-again.jpg", _as_jpeg(distinct(0))), "near d0")]
    run_crawl(settings, write_manifest(tmp_path / "m2.csv", night2), "r2", spark=spark)
    second = run_dedup(settings, "r2", spark=spark)

    assert second.previous_run_id == "r1"
    assert second.hashed_now == 1 and second.hashed_cached == first.unique_images
    assert second.candidate_pairs_reused == first.candidate_pairs_new
    rows = read_dedup_images(open_storage(warehouse), "r2").set_index("product_id")
    assert rows.loc["new", "canonical_sha256"] == rows.loc["d0", "sha256"]
    assert second.accounted == second.image_rows == 9


def _as_jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, "JPEG", quality=80)
    return buf.getvalue()


def test_corrupt_stored_bytes_are_quarantined(spark, planted, tmp_path):
    warehouse = (tmp_path / "wh").as_uri()
    settings = settings_for(warehouse)
    run_crawl(settings, write_manifest(tmp_path / "m.csv", planted), "r1", spark=spark)
    storage = open_storage(warehouse)
    # Bit rot in storage: cut one stored image in half after the crawl checked it.
    key = next(k for k in storage.list("images/category=tools/"))
    table = storage.read_parquet_file(key).to_pydict()
    table["image"][0] = table["image"][0][: len(table["image"][0]) // 3]
    storage.write_table(key, pa.Table.from_pydict(table, schema=storage.read_parquet_file(key).schema))

    summary = run_dedup(settings, "r1", spark=spark)
    assert summary.quarantined == 1 and summary.accounted == summary.image_rows
    assert set(summary.quarantine_reasons) <= {"truncated", "corrupt"}
    quarantine = storage.read_table("quarantine/r1/dedup/").to_pandas()
    assert len(quarantine) == 1 and quarantine.loc[0, "stage"] == "dedup"


def test_a_rerun_after_a_dedup_killed_between_hash_tasks_keeps_every_hash(planted, tmp_path, monkeypatch):
    """A killed run hashed task 0 of its images; the rerun hashes the rest as its own task 0, which
    must not overwrite the killed run's part (found by tests/test_kill_resume.py: every image of
    that part came out without a pHash and dedup crashed writing its quarantine)."""
    import pipelines.dedup.stage as dedup_stage

    warehouse = (tmp_path / "wh").as_uri()
    settings = settings_for(warehouse).model_copy(update={"dedup": settings_for(warehouse).dedup.model_copy(
        update={"images_per_task": 2})})
    run_crawl(settings, write_manifest(tmp_path / "m.csv", planted), "r1", runner="local")

    def killed_after_the_first_task(fn, tasks, **kwargs):
        fn(tasks[0])
        raise SystemExit("killed")

    with monkeypatch.context() as patched:
        patched.setattr(dedup_stage, "run_tasks", killed_after_the_first_task)
        with pytest.raises(SystemExit):
            run_dedup(settings, "r1", runner="local")
    summary = run_dedup(settings, "r1", runner="local")
    assert summary.quarantined == 0 and summary.accounted == summary.image_rows == 8
    assert summary.hashed_now == 7 - 2 and (summary.exact_duplicate_rows, summary.near_duplicate_rows) == (1, 1)


def test_a_cluster_whose_canonical_image_fails_validation_keeps_its_products():
    import pandas as pd

    from pipelines.dedup.stage import with_valid_canonicals

    at = pd.Timestamp("2026-11-23", tz="UTC")
    rows = pd.DataFrame({
        "product_id": ["big", "mid", "small", "alone"], "category": ["tools"] * 4,
        "image_url": ["u1", "u2", "u3", "u4"], "title": [None] * 4,
        "sha256": ["a", "b", "c", "d"], "phash": ["0" * 16] * 4,
        "width": [800, 400, 200, 50], "height": [800, 400, 200, 50],
        "fetched_at": [at, at + pd.Timedelta(1, "s"), at, at],
        "cluster_id": ["a", "a", "a", "d"], "canonical_sha256": ["a", "a", "a", "d"],
        "is_canonical": [True, False, False, True], "duplicate_kind": ["none", "near", "near", "none"],
        "run_id": ["r"] * 4})
    # The 800px canonical image is rejected (say, a TIFF): its 400px copy takes over the cluster,
    # and every product of the cluster, "big" too, is searchable through it.
    out = with_valid_canonicals(rows, rejected={"a"}).set_index("product_id")
    assert sorted(out.index) == ["alone", "big", "mid", "small"]
    assert set(out.loc[["big", "mid", "small"], "canonical_sha256"]) == {"b"}
    assert bool(out.loc["mid", "is_canonical"]) and not bool(out.loc["small", "is_canonical"])
    assert out.loc["alone", "canonical_sha256"] == "d"
    # A cluster with no valid image left is dropped (its rows were quarantined by validation).
    assert sorted(with_valid_canonicals(rows, rejected={"d"})["product_id"]) == ["big", "mid", "small"]
    # Nothing rejected: the rows are unchanged.
    assert with_valid_canonicals(rows, rejected=set())["canonical_sha256"].tolist() == ["a", "a", "a", "d"]
