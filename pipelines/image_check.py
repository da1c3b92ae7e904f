"""Decide whether downloaded bytes are a usable image, and say why not with a reason code.

The format comes from magic bytes, never from the URL's extension or the Content-Type
header (CDNs serve HTML error pages as image/jpeg). The pixel count is checked from the
header before anything is decoded, so a decompression bomb costs nothing; then the image
is decoded once (JPEG at reduced size) to catch truncated and corrupt files.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Checked in order; the first match wins.
_MAGIC = [
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
]
_TEXT_PREFIXES = (b"<!doctype html", b"<html", b"<head", b"<body", b"{", b"[")


class ImageRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def sniff_format(data: bytes) -> str | None:
    """Image format from the first bytes, or None when they are no known image."""
    head = data[:64]
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        return "AVIF" if brand in (b"avif", b"avis") else "HEIC" if brand[:3] in (b"hei", b"mif") else None
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    text = head.lstrip().lower()
    if text.startswith(b"<?xml") or text.startswith(b"<svg") or b"<svg" in data[:1024].lower():
        return "SVG"
    return None


def inspect_image(data: bytes, allowed_formats: list[str] | tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"),
                  max_pixels: int = 50_000_000, min_side: int = 1) -> ImageInfo:
    """Return format and size of a usable image, or raise ImageRejected with a reason code.

    Reason codes: empty_body, not_an_image, unsupported_format, decompression_bomb,
    too_small, truncated, corrupt.
    """
    if not data:
        raise ImageRejected("empty_body", "zero bytes received")
    fmt = sniff_format(data)
    if fmt is None:
        lowered = data[:256].lstrip().lower()
        what = "an HTML page" if lowered.startswith(_TEXT_PREFIXES[:4]) else "no known image format"
        raise ImageRejected("not_an_image", f"the bytes are {what} (starts with {data[:16]!r})")
    if fmt not in allowed_formats:
        raise ImageRejected("unsupported_format", f"{fmt} is not an allowed format ({', '.join(allowed_formats)})")
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below, before decoding; PIL's warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected("decompression_bomb", f"{width}x{height} = {width * height:,} pixels "
                                    f"exceeds crawl.max_pixels={max_pixels:,}")
            if min(width, height) < min_side:
                raise ImageRejected("too_small", f"{width}x{height} is below crawl.min_side={min_side}")
            if image.format == "JPEG":
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # DCT-domain downscale: cheap full scan
            image.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except (UnidentifiedImageError, SyntaxError) as exc:
        raise ImageRejected("corrupt", f"{fmt} header cannot be parsed: {exc}") from None
    except (OSError, ValueError, EOFError) as exc:
        message = str(exc)
        reason = "truncated" if "truncated" in message or "not enough data" in message or isinstance(exc, EOFError) else "corrupt"
        raise ImageRejected(reason, f"{fmt} cannot be decoded: {message}") from None
    return ImageInfo(fmt, int(width), int(height))
