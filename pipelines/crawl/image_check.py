"""Decide whether downloaded bytes are a usable image, and say why not with a reason code.

The format comes from magic bytes, never from the URL's extension or the Content-Type
header (CDNs serve HTML error pages as image/jpeg). The pixel count is checked from the
header before anything is decoded, so a decompression bomb costs nothing; then the image
is decoded once (JPEG at reduced size) to catch truncated and corrupt files.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.decode import ImageDecodeError, open_image, sniff_format
from schemas.reasons import DECOMPRESSION_BOMB, EMPTY_BODY, NOT_AN_IMAGE, TOO_SMALL, UNSUPPORTED_FORMAT

# One error for "these bytes are not a usable image", whichever stage decodes them.
ImageRejected = ImageDecodeError

_TEXT_PREFIXES = (b"<!doctype html", b"<html", b"<head", b"<body")


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def inspect_image(data: bytes, allowed_formats: list[str] | tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"),
                  max_pixels: int = 50_000_000, min_side: int = 1) -> ImageInfo:
    """Return format and size of a usable image, or raise ImageRejected with a reason code.

    Reason codes: empty_body, not_an_image, unsupported_format, decompression_bomb,
    too_small, truncated, corrupt.
    """
    if not data:
        raise ImageRejected(EMPTY_BODY, "zero bytes received")
    fmt = sniff_format(data)
    if fmt is None:
        lowered = data[:256].lstrip().lower()
        what = "an HTML page" if lowered.startswith(_TEXT_PREFIXES) else "no known image format"
        # No bytes of the body in the detail: it may be what an internal service answered.
        raise ImageRejected(NOT_AN_IMAGE, f"the bytes are {what} ({len(data):,} bytes)")
    if fmt not in allowed_formats:
        raise ImageRejected(UNSUPPORTED_FORMAT, f"{fmt} is not an allowed format ({', '.join(allowed_formats)})")

    size: list[int] = []  # the header's size: a drafted JPEG decodes smaller

    def check(image) -> None:
        width, height = image.size
        size.extend((width, height))
        if width * height > max_pixels:
            raise ImageRejected(DECOMPRESSION_BOMB, f"{width}x{height} = {width * height:,} pixels "
                                f"exceeds crawl.max_pixels={max_pixels:,}")
        if min(width, height) < min_side:
            raise ImageRejected(TOO_SMALL, f"{width}x{height} is below crawl.min_side={min_side}")

    # A full scan of the data, decoded cheaply: JPEGs at 1/8 scale in the DCT domain.
    open_image(data, max_pixels=None, check=check,
               draft=lambda width, height: ("RGB", (max(1, width // 8), max(1, height // 8))))
    return ImageInfo(fmt, int(size[0]), int(size[1]))
