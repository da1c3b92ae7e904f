"""The per-partition embedder: unit vectors, stable across runs and formats, bad images reported not fatal."""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from pipelines.embed.embedder import (ImageEmbedder, apply_pca, decode_for_model, embed_partition, fit_pca)
from pipelines.embed.model import FEATURE_DIM, default_spec, model_version

CAT_PHOTO = Path(__file__).parent / "data" / "chelsea.png"


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def drawing(size=(300, 240), background=(255, 255, 255, 0)) -> Image.Image:
    """A product-style drawing: shapes on a transparent (or given) background."""
    image = Image.new("RGBA", size, background)
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 30, 200, 190), fill=(220, 40, 40, 255), outline=(0, 0, 0, 255), width=6)
    draw.rectangle((150, 90, 280, 220), fill=(30, 90, 200, 255))
    return image


@pytest.fixture(scope="module")
def spec():
    return default_spec()


@pytest.fixture(scope="module")
def embedder(spec):
    embedder = ImageEmbedder(spec, "cpu", batch_size=4)
    yield embedder
    embedder.close()


@pytest.fixture(scope="module")
def cat_png():
    return CAT_PHOTO.read_bytes()


def embed_all(embedder, items) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    vectors, failures = {}, []
    for batch in embedder.embed_images(items):
        vectors.update(zip(batch.embeddings["sha256"], batch.embeddings["vector"]))
        failures.append(batch.failures)
    return vectors, pd.concat(failures, ignore_index=True)


def cosine(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_vectors_are_unit_length_and_deterministic(embedder, cat_png):
    images = [("cat", cat_png), ("drawing", encode(drawing(), "PNG")),
              ("flipped", encode(Image.open(CAT_PHOTO).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG"))]
    first, _ = embed_all(embedder, images)
    second, _ = embed_all(embedder, images)
    for key, vector in first.items():
        assert vector.dtype == np.float32 and vector.shape == (FEATURE_DIM,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(second[key], vector, atol=1e-5)
    assert cosine(first["cat"], first["drawing"]) < 0.9  # different images really differ


def test_same_photo_as_png_and_jpeg_embeds_alike(embedder, cat_png):
    photo = Image.open(CAT_PHOTO)
    big_jpeg = encode(photo.resize((1804, 1200), Image.Resampling.BICUBIC), "JPEG", quality=95)  # decoded with draft
    vectors, _ = embed_all(embedder, [("png", cat_png), ("jpeg", encode(photo, "JPEG", quality=95)),
                                      ("big_jpeg", big_jpeg)])
    assert cosine(vectors["png"], vectors["jpeg"]) > 0.95
    assert cosine(vectors["png"], vectors["big_jpeg"]) > 0.95


def test_transparent_images_are_seen_on_white(embedder, spec):
    on_white = drawing(background=(255, 255, 255, 255)).convert("RGB")
    transparent = drawing()
    palette = transparent.convert("P", palette=Image.Palette.ADAPTIVE)  # also a P-mode PNG with transparency
    pixels = decode_for_model(encode(transparent, "PNG"), spec.preprocessing)
    assert tuple(pixels[2, 2]) == (255, 255, 255)  # a corner of the transparent background
    vectors, failures = embed_all(embedder, [("white", encode(on_white, "PNG")),
                                             ("rgba", encode(transparent, "PNG")),
                                             ("grey_on_white", encode(on_white.convert("L"), "PNG")),
                                             ("la", encode(transparent.convert("LA"), "PNG")),
                                             ("p", encode(palette, "PNG"))])
    assert failures.empty
    assert cosine(vectors["white"], vectors["rgba"]) > 0.999
    assert cosine(vectors["grey_on_white"], vectors["la"]) > 0.999
    assert cosine(vectors["white"], vectors["p"]) > 0.95  # palette quantisation shifts colours a little


def _on_canvas(art: Image.Image, canvas=(800, 1600), at=(10, 15)) -> Image.Image:
    """A drawing in the top-left corner of a large transparent page (how clip art is often drawn)."""
    page = Image.new("RGBA", canvas, (255, 255, 255, 0))
    page.paste(art, at, art)
    return page


def test_center_crop_of_a_drawing_in_a_page_corner_is_blank_and_trim_framing_finds_it(spec):
    page = encode(_on_canvas(drawing()), "PNG")
    center_crop = replace(spec.preprocessing, framing="center_crop")
    assert decode_for_model(page, center_crop).min() == 255     # what center-crop framing sees: nothing
    assert spec.preprocessing.framing == "trim"                  # the default
    pixels = decode_for_model(page, spec.preprocessing)
    assert pixels.shape == (224, 224, 3)
    dark = np.argwhere(pixels.min(axis=2) < 128)
    (top, left), (bottom, right) = dark.min(axis=0), dark.max(axis=0)
    # the drawing's box is 300 x 240 -> fitted whole, its long side 224 * (1 - 2 * 0.0625) = 196, centred
    assert 12 <= left <= 16 and 208 <= right <= 212 and abs((top + bottom) / 2 - 112) <= 4
    assert tuple(pixels[2, 2]) == (255, 255, 255)


def test_trim_framing_embeds_a_drawing_alike_wherever_it_sits_on_its_page(spec):
    center_crop = replace(spec, preprocessing=replace(spec.preprocessing, framing="center_crop"))
    assert model_version(center_crop) != model_version(spec)
    embedder = ImageEmbedder(spec, "cpu", batch_size=4)
    try:
        art = drawing()
        vectors, failures = embed_all(embedder, [
            ("alone", encode(art, "PNG")),
            ("corner", encode(_on_canvas(art), "PNG")),
            ("elsewhere", encode(_on_canvas(art, canvas=(1200, 900), at=(700, 500)), "PNG")),
            ("jpeg_page", encode(_on_canvas(art).convert("RGBA").convert("RGB"), "JPEG", quality=90)),
            ("cat", encode(Image.open(CAT_PHOTO), "PNG")),
            ("blank", encode(Image.new("RGB", (300, 300), "white"), "PNG"))])
    finally:
        embedder.close()
    assert failures.empty and set(vectors) == {"alone", "corner", "elsewhere", "jpeg_page", "cat", "blank"}
    assert cosine(vectors["alone"], vectors["corner"]) > 0.99
    assert cosine(vectors["alone"], vectors["elsewhere"]) > 0.99
    assert cosine(vectors["alone"], vectors["cat"]) < 0.8
    assert all(abs(np.linalg.norm(v) - 1) < 1e-4 for v in vectors.values())


def test_trim_framing_on_tensors_matches_the_pil_path(spec):
    """The nvJPEG path frames decoded tensors with torch; run here on CPU tensors against PIL."""
    from pipelines.embed.embedder import trimmed_frame_tensor

    trim = spec.preprocessing
    page = _on_canvas(drawing()).convert("RGBA")
    flat = Image.new("RGB", page.size, "white")
    flat.paste(page, mask=page.getchannel("A"))
    expected = decode_for_model(encode(flat, "PNG"), trim).astype(int)
    framed = trimmed_frame_tensor(torch.from_numpy(np.array(flat)).permute(2, 0, 1).contiguous(), trim)
    got = framed.permute(1, 2, 0).numpy().astype(int)
    assert got.shape == expected.shape and np.abs(got - expected).mean() < 1.0


def test_framing_is_checked():
    from pipelines.embed.model import Preprocessing

    with pytest.raises(ValueError, match="framing"):
        Preprocessing(framing="stretch")


def test_corrupt_images_are_reported_with_a_reason_and_the_rest_embedded(embedder, cat_png):
    jpeg = encode(Image.open(CAT_PHOTO), "JPEG", quality=90)
    items = [("good1", cat_png), ("html", b"<!doctype html><html>404</html>"), ("empty", b""),
             ("cut_jpeg", jpeg[: len(jpeg) // 2]), ("cut_png", cat_png[: len(cat_png) // 3]),
             ("good2", jpeg), ("noise", bytes(range(256)) * 10)]
    vectors, failures = embed_all(embedder, items)
    assert set(vectors) == {"good1", "good2"}
    reasons = dict(zip(failures["sha256"], failures["reason"]))
    assert reasons == {"html": "not_an_image", "empty": "not_an_image", "noise": "not_an_image",
                       "cut_jpeg": "truncated", "cut_png": "truncated"}
    assert all(failures["detail"].str.len() > 0)


def test_partition_frames_in_any_sizes_come_out_complete(embedder, cat_png):
    variants = [encode(Image.open(CAT_PHOTO).rotate(angle), "JPEG", quality=90) for angle in range(0, 50, 5)]
    frames = [pd.DataFrame({"sha256": [f"img{i}" for i in range(start, stop)], "image": variants[start:stop]})
              for start, stop in [(0, 3), (3, 3), (3, 10)]]  # including an empty frame
    batches = list(embedder.embed_frames(iter(frames)))
    assert [len(batch.embeddings) for batch in batches] == [4, 4, 2]  # re-chunked to the model batch size
    assert [sha for batch in batches for sha in batch.embeddings["sha256"]] == [f"img{i}" for i in range(10)]
    with pytest.raises(KeyError, match="found: id, bytes"):
        list(embedder.embed_frames([pd.DataFrame({"id": ["x"], "bytes": [b""]})]))


def test_spark_shaped_output_carries_vectors_and_failures_in_one_frame(spec, cat_png):
    frame = pd.DataFrame({"sha256": ["ok", "bad"], "image": [cat_png, b"not an image"]})
    [out] = list(embed_partition(iter([frame]), spec, "cpu", batch_size=8, vector_dtype="float16"))
    assert list(out.columns) == ["sha256", "vector", "failure_reason", "failure_detail"]
    ok, bad = out.set_index("sha256").loc["ok"], out.set_index("sha256").loc["bad"]
    assert ok["vector"].dtype == np.float16 and ok["failure_reason"] is None
    assert bad["vector"] is None and bad["failure_reason"] == "not_an_image"


def test_pca_projection_inside_the_model_matches_numpy(spec, embedder, cat_png):
    rng = np.random.default_rng(0)
    catalog = rng.normal(size=(200, FEATURE_DIM)).astype(np.float32)
    catalog /= np.linalg.norm(catalog, axis=1, keepdims=True)
    pca = fit_pca(catalog, output_dim=16, whiten=True)
    projected = (catalog - pca.mean) @ pca.components.T
    np.testing.assert_allclose(np.cov(projected, rowvar=False), np.eye(16), atol=1e-3)  # whitened
    assert fit_pca(catalog, 16).digest == pca.digest  # refitting the same catalog gives the same version

    pca_spec = replace(spec, pca=pca)
    assert model_version(pca_spec) != model_version(spec)
    pca_embedder = ImageEmbedder(pca_spec, "cpu", batch_size=4)
    [batch] = list(pca_embedder.embed_images([("cat", cat_png)]))
    [full] = list(embedder.embed_images([("cat", cat_png)]))
    reduced = batch.embeddings["vector"][0]
    assert reduced.shape == (16,) and np.linalg.norm(reduced) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(reduced, apply_pca(full.embeddings["vector"][0][None], pca)[0], atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_gpu_path_agrees_with_cpu_and_still_reports_truncated_jpegs(spec, embedder, cat_png):
    jpeg = encode(Image.open(CAT_PHOTO).resize((902, 600)), "JPEG", quality=95)
    items = [("png", cat_png), ("jpeg", jpeg), ("cut_jpeg", jpeg[: len(jpeg) // 2])]
    gpu = ImageEmbedder(spec, "cuda:0", batch_size=8)
    gpu_vectors, gpu_failures = embed_all(gpu, items)
    cpu_vectors, _ = embed_all(embedder, items)
    assert dict(zip(gpu_failures["sha256"], gpu_failures["reason"])) == {"cut_jpeg": "truncated"}
    for key in ("png", "jpeg"):  # fp16 autocast and nvJPEG + GPU resize: close, not bit-equal
        assert cosine(gpu_vectors[key], cpu_vectors[key]) > 0.99
