"""Image checks: format from magic bytes, pixel bombs refused before decoding, truncation caught."""
import io
import struct
import zlib

import pytest
from PIL import Image

from conftest import make_jpeg, make_png
from pipelines.crawl.image_check import ImageRejected, inspect_image, sniff_format


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few dozen bytes (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_real_images_pass_with_format_from_bytes():
    assert inspect_image(make_png(size=(64, 48))) .__dict__ == {"format": "PNG", "width": 64, "height": 48}
    assert inspect_image(make_jpeg(size=(80, 60))).format == "JPEG"
    buf = io.BytesIO()
    Image.new("RGB", (10, 10)).save(buf, "WEBP")
    assert inspect_image(buf.getvalue()).format == "WEBP"


@pytest.mark.parametrize("data, reason", [
    (b"", "empty_body"),
    (b"<!DOCTYPE html><html><body>502</body></html>", "not_an_image"),
    (b"\x00\x01\x02garbage" * 10, "not_an_image"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "unsupported_format"),
    (b"%PDF-1.4 ...", "unsupported_format"),
])
def test_non_images_are_rejected_with_reason(data, reason):
    with pytest.raises(ImageRejected) as exc:
        inspect_image(data)
    assert exc.value.reason == reason


def test_decompression_bomb_refused_from_header():
    with pytest.raises(ImageRejected) as exc:
        inspect_image(png_header_only(100_000, 100_000))
    assert exc.value.reason == "decompression_bomb" and "10000000000 pixels" in exc.value.detail
    # a real image over a lowered limit is refused the same way
    with pytest.raises(ImageRejected) as exc:
        inspect_image(make_png(size=(200, 200)), max_pixels=10_000)
    assert exc.value.reason == "decompression_bomb"


@pytest.mark.parametrize("maker", [make_png, make_jpeg])
def test_truncated_files_are_caught(maker):
    data = maker(size=(400, 300)) if maker is make_jpeg else make_png(size=(400, 300), pattern=3)
    with pytest.raises(ImageRejected) as exc:
        inspect_image(data[: len(data) // 2])
    assert exc.value.reason in ("truncated", "corrupt")


def test_format_not_allowed():
    with pytest.raises(ImageRejected) as exc:
        inspect_image(make_png(), allowed_formats=["JPEG"])
    assert exc.value.reason == "unsupported_format"


def test_sniff_ignores_extension_and_content_type():
    assert sniff_format(make_jpeg()) == "JPEG"
    assert sniff_format(make_png()) == "PNG"
    assert sniff_format(b"GIF89a....") == "GIF"
