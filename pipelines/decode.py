"""The one image decoder: bytes -> a loaded PIL image, or ImageDecodeError with a reason code.

The crawl's image check, dedup's hashing and embed's framing all decode through `open_image`,
so one file is rejected for the same reason wherever it is met. The pixel count is checked
from the header before any pixel is decoded (decompression bombs cost nothing), and every
failure Pillow can raise on hostile bytes becomes a reason code (schemas.reasons); nothing
else escapes.
"""
from __future__ import annotations

import io
import warnings
import zlib
from typing import Callable

from PIL import Image, UnidentifiedImageError

from schemas.reasons import CORRUPT, DECOMPRESSION_BOMB, NOT_AN_IMAGE, TRUNCATED

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS

# File name suffixes the folder tools (hash, near-duplicates, search --image-dir) treat as images.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})

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

# Everything Pillow's decoders raise on cut or damaged files.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, zlib.error, MemoryError)

# (width, height) of the full image -> (mode, requested size) for Image.draft, or None.
Draft = Callable[[int, int], "tuple[str, tuple[int, int]] | None"]


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; ``reason`` is a code of schemas.reasons."""

    def __init__(self, reason: str, detail: str, index: int | None = None):
        self.reason = reason
        self.detail = detail
        self.index = index
        where = f" (item {index})" if index is not None else ""
        super().__init__(f"cannot decode image{where}: {reason}: {detail}")


def sniff_format(data: bytes) -> str | None:
    """Image format from the first bytes (never the URL or Content-Type), or None."""
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


def decode_failure(error: BaseException, what: str = "cannot decode") -> ImageDecodeError:
    """Pillow reports a cut-off file as EOFError or as an error saying 'truncated'."""
    message = str(error)
    truncated = isinstance(error, EOFError) or "truncated" in message.lower() or "not enough data" in message
    return ImageDecodeError(TRUNCATED if truncated else CORRUPT, f"{what}: {type(error).__name__}: {message}")


def open_image(data: bytes, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, draft: Draft | None = None,
               check: Callable[[Image.Image], None] | None = None) -> Image.Image:
    """Decode ``data`` fully into a PIL image, or raise ImageDecodeError.

    ``max_pixels`` rejects images whose header declares more pixels (None: no limit).
    ``draft`` may ask JPEG decoders for a reduced-scale decode (DCT domain, far cheaper).
    ``check`` sees the opened, not yet decoded image (its header) and may raise.
    """
    if not data:
        raise ImageDecodeError(NOT_AN_IMAGE, "zero bytes")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; the limit here is a decision.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageDecodeError(DECOMPRESSION_BOMB, f"{width}x{height} = {width * height:,} pixels "
                                                           f"exceeds {max_pixels:,}")
            if check is not None:
                check(image)
            if draft is not None and image.format == "JPEG":
                request = draft(width, height)
                if request is not None:
                    image.draft(*request)
            image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(DECOMPRESSION_BOMB, str(error)) from None
    except UnidentifiedImageError:
        signature = sniff_format(data)
        if signature:  # starts like an image, but the header is cut or broken
            raise ImageDecodeError(CORRUPT, f"{signature} signature but unreadable header") from None
        raise ImageDecodeError(NOT_AN_IMAGE, f"no known image signature ({len(data):,} bytes)") from None
    except DECODE_ERRORS as error:
        raise decode_failure(error) from None
    return image


def flatten_alpha(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The image with its transparent pixels composited on ``background`` (a product shot on
    white), as RGB; an image without transparency is returned unchanged."""
    if image.mode in ("P", "PA") and (image.mode == "PA" or "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "La", "RGBa"):
        return image
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, background)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas
