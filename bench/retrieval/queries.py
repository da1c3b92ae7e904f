"""Query images for the retrieval benchmark: altered copies of catalog images.

`alter_image(data, rng)` turns one catalog image (bytes, any format the crawl accepts) into
what a shopper might upload: a photo-like JPEG of the same product, slightly cropped, tilted,
re-coloured and smaller. Every random choice comes from `rng`, so a seed gives the same
queries byte for byte (on the same Pillow/torchvision versions).

This module never reads the warehouse or the snapshot: bytes in, bytes out.
"""
from __future__ import annotations

import io
import random
import warnings
from dataclasses import asdict, dataclass

from PIL import Image

WHITE = (255, 255, 255)

# The alteration chain, as the issue states it.
CROP_RANGE = (0.85, 0.92)        # kept fraction of each side, at a random offset
MAX_ROTATION_DEG = 6.0           # uniform in [-6, 6], white fill
BRIGHTNESS_RANGE = (0.90, 1.10)  # +-10 %
SATURATION_RANGE = (0.80, 1.20)  # "colour jitter": small saturation change ...
HUE_RANGE = (-0.03, 0.03)        # ... and a small hue shift (fraction of the colour wheel, +-11 degrees)
DOWNSCALE_RANGE = (0.50, 0.80)   # output side / input side
JPEG_QUALITY = 70


@dataclass
class Alteration:
    """What was done to one query image (saved in RESULTS.json for failures)."""
    source_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    rotation_deg: float
    saturation: float
    hue: float
    brightness: float
    scale: float
    output_size: tuple[int, int]
    jpeg_quality: int = JPEG_QUALITY

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("rotation_deg", "saturation", "hue", "brightness", "scale"):
            out[key] = round(out[key], 4)
        return out


def flatten_on_white(image: Image.Image) -> Image.Image:
    """RGB; transparency composited on white (a product shot on a white background)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = image.convert("L")
    if image.mode == "P" or "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def alter_image(data: bytes, rng: random.Random) -> tuple[bytes, Alteration]:
    """One catalog image -> (JPEG bytes of its altered copy, what was done), in the issue's order:
    crop to 85-92 % of each side at a random offset, rotate up to +-6 degrees (white fill),
    colour (saturation, hue) and brightness jitter, downscale to 50-80 %, JPEG quality 70."""
    from torchvision.transforms import functional as TF

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette/EXIF quirks of some clipart PNGs
        image = flatten_on_white(Image.open(io.BytesIO(data)))
    width, height = image.size

    keep_w, keep_h = rng.uniform(*CROP_RANGE), rng.uniform(*CROP_RANGE)
    crop_w, crop_h = max(1, round(width * keep_w)), max(1, round(height * keep_h))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    box = (left, top, left + crop_w, top + crop_h)
    image = image.crop(box)

    angle = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)
    # expand=True: the tilted picture keeps all of its pixels, the new corners are white
    image = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=WHITE)

    saturation, hue, brightness = rng.uniform(*SATURATION_RANGE), rng.uniform(*HUE_RANGE), rng.uniform(*BRIGHTNESS_RANGE)
    image = TF.adjust_saturation(image, saturation)
    image = TF.adjust_hue(image, hue)
    image = TF.adjust_brightness(image, brightness)

    scale = rng.uniform(*DOWNSCALE_RANGE)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)

    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), Alteration((width, height), box, angle, saturation, hue, brightness, scale, size)
