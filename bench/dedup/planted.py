"""Benchmark inputs built from the sample catalog (Debian's openclipart-png).

* catalog JPEGs: PNG drawings composited on white, saved as JPEG quality 90 (what a
  product catalog serves);
* a planted set: N originals plus one transformed copy of each, the transform cycling
  through the five of issue 4, with the ground truth (copy -> original) in labels.json.

Originals are drawn with a fixed seed, skipping files that Pillow refuses (decompression
bombs), blank drawings (nothing but white once composited: every blank image is a true
duplicate of every other) and drawings that are near-identical, at their own resolution,
to an earlier original (same size, mean absolute pixel difference below 3/255: the
package ships a few drawings twice or re-saved), so that a pair of originals found
"alike" counts as a real false positive. Close variants (other colours, another card, the
same icon with another emblem) stay in as hard negatives.

The sample catalog leaves out the package's generated star polygons (see
pipelines/sample_catalog.py), and so does the planted set; ``generated_stars=True`` builds a
planted set of only those, which run.py reports on its own.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from pipelines.sample_catalog import GENERATED_PATTERNS

OPENCLIPART_ROOT = Path("/usr/share/openclipart/png")
MAX_SOURCE_PIXELS = 4_000_000
NEAR_IDENTICAL_MEAN_DIFFERENCE = 3.0
TRANSFORMS = ("resize_50", "jpeg_q45", "crop_3pct", "watermark", "brightness_8pct")


def openclipart_pngs(generated_stars: bool = False) -> list[Path]:
    """The sample catalog's PNGs, or (``generated_stars``) only the generated star polygons."""
    paths = sorted(OPENCLIPART_ROOT.rglob("*.png"))
    if not paths:
        raise SystemExit(f"no PNGs under {OPENCLIPART_ROOT}: apt-get install openclipart-png")
    return [p for p in paths if bool(GENERATED_PATTERNS.match(p.relative_to(OPENCLIPART_ROOT).as_posix()))
            == generated_stars]


def on_white(path: Path) -> Image.Image | None:
    """The drawing composited on a white background, or None when unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        if image.width * image.height > MAX_SOURCE_PIXELS:
            return None
        image = image.convert("RGBA")
    except Exception:  # a broken sample file is skipped, not a benchmark failure
        return None
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    background.alpha_composite(image)
    return background.convert("RGB")


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def usable_originals(seed: int, skip: int = 0, generated_stars: bool = False):
    """Yield (source path, RGB image) in a seeded order, filtered as the docstring says."""
    paths = openclipart_pngs(generated_stars)
    random.Random(seed).shuffle(paths)
    kept_by_size: dict[tuple[int, int], list[np.ndarray]] = {}
    for path in paths[skip:]:
        image = on_white(path)
        if image is None or min(image.size) < 16:
            continue
        pixels = np.asarray(image, dtype=np.int16)
        if pixels.std() < 2.0:
            continue
        same_size = kept_by_size.setdefault(image.size, [])
        if any(np.abs(pixels - kept).mean() < NEAR_IDENTICAL_MEAN_DIFFERENCE for kept in same_size):
            continue
        same_size.append(pixels)
        yield path, image


def make_catalog_jpegs(directory: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` catalog JPEGs (quality 90) in ``directory``; reused when already there."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(directory.glob("*.jpg"))
    if len(existing) >= count:
        return existing[:count]
    files = []
    for number, (_, image) in enumerate(usable_originals(seed)):
        if number == count:
            break
        target = directory / f"{number:06d}.jpg"
        target.write_bytes(jpeg_bytes(image, 90))
        files.append(target)
    return files


def watermark(image: Image.Image, rng: random.Random) -> Image.Image:
    """A small semi-transparent shop name in a corner, as resellers stamp photos."""
    stamped = image.convert("RGBA")
    layer = Image.new("RGBA", stamped.size, (0, 0, 0, 0))
    size = max(8, round(min(stamped.size) * 0.06))
    font = ImageFont.load_default(size=size)
    text = rng.choice(["(c) shop24", "bestdeals", "(c) megastore", "resale.example"])
    draw = ImageDraw.Draw(layer)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    margin = max(2, size // 3)
    corner = rng.choice(["bottom-right", "bottom-left", "top-right"])
    x = stamped.width - (right - left) - margin if corner.endswith("right") else margin
    y = margin if corner.startswith("top") else stamped.height - (bottom - top) - margin - top
    draw.text((x, y), text, font=font, fill=(90, 90, 90, 170))
    stamped.alpha_composite(layer)
    return stamped.convert("RGB")


def transformed_copy(original_jpeg: bytes, transform: str, rng: random.Random) -> bytes:
    """A copy of a catalog JPEG as a reseller would re-upload it."""
    image = Image.open(io.BytesIO(original_jpeg)).convert("RGB")
    if transform == "resize_50":
        image = image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.LANCZOS)
    elif transform == "jpeg_q45":
        return jpeg_bytes(image, 45)
    elif transform == "crop_3pct":
        dx, dy = round(image.width * 0.03), round(image.height * 0.03)
        image = image.crop((dx, dy, image.width - dx, image.height - dy))
    elif transform == "watermark":
        image = watermark(image, rng)
    elif transform == "brightness_8pct":
        image = ImageEnhance.Brightness(image).enhance(1.08)
    else:
        raise ValueError(f"unknown transform {transform!r}")
    return jpeg_bytes(image, 90)


def make_planted_set(directory: Path, originals: int, seed: int, skip: int = 0,
                     generated_stars: bool = False) -> dict:
    """``originals`` catalog JPEGs plus one copy each; returns and writes labels.json:
    {"originals": [file...], "copies": [{"file", "original", "transform"}...]}."""
    labels_path = directory / "labels.json"
    if labels_path.exists():
        labels = json.loads(labels_path.read_text())
        if (len(labels["originals"]) == originals and labels.get("seed") == seed and labels.get("skip") == skip
                and labels.get("generated_stars") == generated_stars):
            return labels
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for stale in directory.glob("*.jpg"):
        stale.unlink()
    labels = {"seed": seed, "skip": skip, "generated_stars": generated_stars, "originals": [], "copies": []}
    for number, (source, image) in enumerate(usable_originals(seed, skip, generated_stars)):
        if number == originals:
            break
        original_name = f"o{number:05d}.jpg"
        original_bytes = jpeg_bytes(image, 90)
        (directory / original_name).write_bytes(original_bytes)
        transform = TRANSFORMS[number % len(TRANSFORMS)]
        copy_name = f"c{number:05d}_{transform}.jpg"
        (directory / copy_name).write_bytes(transformed_copy(original_bytes, transform, rng))
        labels["originals"].append(original_name)
        labels["copies"].append(
            {"file": copy_name, "original": original_name, "transform": transform, "source": str(source)}
        )
    labels_path.write_text(json.dumps(labels, indent=1))
    return labels
