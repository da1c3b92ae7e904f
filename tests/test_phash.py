"""pHash: bit-for-bit imagehash.phash on real sample images; bad bytes give typed errors."""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipelines.dedup.near_duplicates import hamming_distance
from pipelines.dedup.phash import (
    CORRUPT,
    DECOMPRESSION_BOMB,
    NOT_AN_IMAGE,
    TRUNCATED,
    ImageDecodeError,
    flatten_alpha,
    phash_bytes,
    phash_from_hex,
    phash_hex,
    phash_many,
    try_phash_many,
)

OPENCLIPART = Path("/usr/share/openclipart/png")

pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")


def imagehash_hex(data: bytes) -> str:
    return str(imagehash.phash(Image.open(io.BytesIO(data))))


def jpeg_on_white(png: bytes, quality: int = 90) -> bytes:
    drawing = Image.open(io.BytesIO(png)).convert("RGBA")
    background = Image.new("RGBA", drawing.size, (255, 255, 255, 255))
    background.alpha_composite(drawing)
    buffer = io.BytesIO()
    background.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def sample_pngs() -> list[bytes]:
    paths = sorted(OPENCLIPART.rglob("*.png"))
    if not paths:
        pytest.skip("openclipart-png is not installed (apt-get install openclipart-png)")
    random.Random(4).shuffle(paths)
    small = [path for path in paths if path.stat().st_size < 300_000]
    return [path.read_bytes() for path in small[:60]]


@pytest.fixture(scope="module")
def sample_jpegs(sample_pngs) -> list[bytes]:
    return [jpeg_on_white(png) for png in sample_pngs[:40]]


def has_transparency(data: bytes) -> bool:
    image = Image.open(io.BytesIO(data))
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def test_batch_hashes_equal_imagehash_on_sample_pngs(sample_pngs):
    hashes = phash_many(sample_pngs)
    assert hashes.dtype == np.uint64
    # Opaque images: imagehash.phash exactly. Transparent ones: imagehash.phash of the image
    # composited on white (imagehash alone would hash the colour under the transparency).
    expected = [str(imagehash.phash(flatten_alpha(Image.open(io.BytesIO(png))))) if has_transparency(png)
                else imagehash_hex(png) for png in sample_pngs]
    assert [phash_hex(value) for value in hashes] == expected
    assert 5 < sum(map(has_transparency, sample_pngs)) < len(sample_pngs)  # both kinds are covered


def test_a_line_drawing_on_a_transparent_canvas_is_not_a_black_square():
    canvas = Image.new("RGBA", (120, 120), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).line([(10, 100), (60, 15), (110, 100)], fill=(0, 0, 0, 255), width=3)
    other = Image.new("RGBA", (120, 120), (0, 0, 0, 0))
    ImageDraw.Draw(other).ellipse([20, 20, 100, 100], outline=(0, 0, 0, 255), width=3)
    blobs = []
    for image in (canvas, other):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    assert imagehash_hex(blobs[0]) == imagehash_hex(blobs[1]) == "0" * 16  # what imagehash sees: black squares
    first, second = phash_many(blobs)
    assert hamming_distance(first, second) > 16  # a caret and a ring are far apart once on white


def test_batch_hashes_equal_imagehash_on_jpegs(sample_jpegs):
    hashes = phash_many(sample_jpegs)
    assert [phash_hex(value) for value in hashes] == [imagehash_hex(jpeg) for jpeg in sample_jpegs]


def test_single_hash_equals_batch_and_hex_round_trips(sample_jpegs):
    batch = phash_many(sample_jpegs[:5])
    for data, expected in zip(sample_jpegs[:5], batch):
        value = phash_bytes(data)
        assert value == int(expected)
        assert phash_from_hex(phash_hex(value)) == value
        assert len(phash_hex(value)) == 16


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_ties_on_blank_and_nearly_blank_images_match_imagehash():
    # Blank images put most DCT coefficients exactly at the median: any arithmetic that
    # differs from imagehash's in the last bit flips those bits.
    blank = Image.new("RGB", (120, 90), "white")
    dot = blank.copy()
    ImageDraw.Draw(dot).point((7, 5), fill="black")
    symmetric = blank.copy()
    ImageDraw.Draw(symmetric).ellipse((20, 10, 100, 80), outline="black")
    images = [encoded(image, fmt) for image in (blank, dot, symmetric) for fmt in ("PNG", "JPEG")]
    assert [phash_hex(value) for value in phash_many(images)] == [imagehash_hex(data) for data in images]


def test_grayscale_palette_and_cmyk_modes_match_imagehash():
    rgb = Image.radial_gradient("L").resize((150, 110)).convert("RGB")
    images = [
        encoded(rgb.convert("L"), "PNG"),
        encoded(rgb.convert("P"), "PNG"),
        encoded(rgb.convert("CMYK"), "JPEG"),
        encoded(rgb.convert("L"), "JPEG"),
        encoded(rgb, "GIF"),
    ]
    assert [phash_hex(value) for value in phash_many(images)] == [imagehash_hex(data) for data in images]


def test_reduced_jpeg_decode_stays_close_to_imagehash(sample_jpegs):
    exact = phash_many(sample_jpegs)
    drafted = phash_many(sample_jpegs, draft_size=64)
    distances = hamming_distance(exact, drafted)
    # The reduced decode changes pixels, so hashes may move a little; a large drift
    # would break cross-checks and dedup recall.
    assert np.median(distances) <= 2
    assert np.mean(distances <= 2) >= 0.8


def test_reduced_decode_does_not_change_png_hashes(sample_pngs):
    assert np.array_equal(phash_many(sample_pngs[:10], draft_size=64), phash_many(sample_pngs[:10]))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_claiming(width: int, height: int) -> bytes:
    """A few dozen bytes whose header promises width x height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("make_bytes", "reason"),
    [
        (lambda jpeg: b"", NOT_AN_IMAGE),
        (lambda jpeg: b"<!DOCTYPE html><html><body>404 Not Found</body></html>", NOT_AN_IMAGE),
        (lambda jpeg: b"\x00" * 512, NOT_AN_IMAGE),
        (lambda jpeg: jpeg[: len(jpeg) // 2], TRUNCATED),
        (lambda jpeg: jpeg[:200], TRUNCATED),
        (lambda jpeg: b"\xff\xd8\xff\xe0" + b"\x00" * 300, CORRUPT),
        (lambda jpeg: png_header_claiming(100_000, 100_000), DECOMPRESSION_BOMB),
    ],
    ids=["zero-bytes", "html", "zeros", "half-jpeg", "jpeg-header-only", "jpeg-signature-garbage", "png-bomb"],
)
def test_bad_bytes_raise_typed_error(sample_jpegs, make_bytes, reason):
    with pytest.raises(ImageDecodeError) as raised:
        phash_bytes(make_bytes(sample_jpegs[0]))
    assert raised.value.reason == reason
    assert isinstance(raised.value, ValueError)
    assert reason in str(raised.value)


def test_truncated_png_is_reported_truncated(sample_pngs):
    png = max(sample_pngs, key=len)
    with pytest.raises(ImageDecodeError) as raised:
        phash_bytes(png[: len(png) // 2])
    assert raised.value.reason == TRUNCATED


def test_pixel_limit_rejects_before_decoding(sample_jpegs):
    with pytest.raises(ImageDecodeError) as raised:
        phash_many(sample_jpegs[:1], max_pixels=100)
    assert raised.value.reason == DECOMPRESSION_BOMB


def test_batch_error_names_the_bad_item(sample_jpegs):
    batch = [sample_jpegs[0], sample_jpegs[1], b"<html>", sample_jpegs[2]]
    with pytest.raises(ImageDecodeError) as raised:
        phash_many(batch)
    assert raised.value.index == 2
    assert raised.value.reason == NOT_AN_IMAGE


def test_try_phash_many_hashes_good_rows_and_reports_bad_ones(sample_jpegs):
    batch = [sample_jpegs[0], b"", sample_jpegs[1], sample_jpegs[2][:300], sample_jpegs[3]]
    hashes, reasons = try_phash_many(batch)
    assert reasons == [None, NOT_AN_IMAGE, None, TRUNCATED, None]
    good = [0, 2, 4]
    assert [phash_hex(hashes[k]) for k in good] == [imagehash_hex(batch[k]) for k in good]
    assert hashes[1] == 0 and hashes[3] == 0


def test_empty_batch():
    assert phash_many([]).shape == (0,)
    hashes, reasons = try_phash_many([])
    assert hashes.shape == (0,) and reasons == []
