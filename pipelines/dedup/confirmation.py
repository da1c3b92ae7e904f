"""Second, independent confirmation of a candidate pair: a pixel-level score.

The confirmation score exists because pHash alone, on drawings and product photos on
plain backgrounds, merges different images (issue 4: 43% precision). It correlates colour
thumbnails of the two images at the smaller one's resolution, after trying the small
border crops resellers apply, and shares nothing with the pHash bits.

Pure computation on PIL images and arrays: no I/O, no Spark.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipelines.decode import flatten_alpha

# Border crops tried when aligning two images (fraction cut from every side): resellers
# trim borders, which shifts and rescales everything a few per cent.
CONFIRMATION_CROPS = (0.0, 0.015, 0.03, 0.045, 0.06)
CONFIRMATION_MAX_SIDE = 128
CONFIRMATION_MIN_SIDE = 16
# Tuned on two planted sets from the sample catalog (2 x ~880 originals + their copies,
# disjoint from bench/dedup's evaluation set) with 16-bit candidates: 0.96 gave precision
# 0.970 / 0.989 and recall 0.976 / 0.986; 0.965 gave 0.976 / 0.991 for 0.3-0.8 points of
# recall, chosen for the margin. Near misses are icon variants that differ in one small
# emblem. See bench/dedup/README.md.
CONFIRMATION_THRESHOLD = 0.965
_CONFIRMATION_VIEWS_KEPT = 256


def _comparison_side(size_a: tuple[int, int], size_b: tuple[int, int]) -> int:
    """Compare at the smaller image's own resolution (capped): a downscaled copy holds no
    detail beyond its size, and the originals' fine detail is what tells apart two
    different drawings that look alike in a small thumbnail."""
    side = min(*size_a, *size_b, CONFIRMATION_MAX_SIDE)
    return max(side, CONFIRMATION_MIN_SIDE)


def confirmation_views(image: Image.Image, side: int) -> np.ndarray:
    """One unit-length, mean-free RGB vector per crop in CONFIRMATION_CROPS, of the image
    resized to ``side`` x ``side``. Mean-free and unit-length: a brightness or contrast
    change of the whole image does not move it; a colour change does."""
    rgb = flatten_alpha(image)  # transparent pixels on white, as the hash and the embedder see them
    rgb = rgb if rgb.mode == "RGB" else rgb.convert("RGB")
    if rgb.width > 2 * side and rgb.height > 2 * side:
        # One area-average to twice the comparison size; the crops are cut from that.
        rgb = rgb.resize((2 * side, 2 * side), Image.BOX)
    width, height = rgb.size
    thumbnails = np.stack([
        np.asarray(rgb.resize((side, side), Image.BOX, box=(width * crop, height * crop, width * (1 - crop), height * (1 - crop))))
        for crop in CONFIRMATION_CROPS
    ])
    # Channel-first so that the per-channel means reduce over contiguous memory.
    views = np.ascontiguousarray(thumbnails.reshape(len(CONFIRMATION_CROPS), -1, 3).transpose(0, 2, 1))
    views = views.astype(np.float32)
    views -= views.mean(axis=2, keepdims=True)
    views = views.reshape(len(CONFIRMATION_CROPS), -1)
    norms = np.sqrt(np.einsum("kd,kd->k", views, views))[:, None]
    return np.divide(views, norms, out=np.zeros_like(views), where=norms > 0)


def _aligned_correlation(views_a: np.ndarray, views_b: np.ndarray) -> float:
    """Best correlation of one image's full view with the other's cropped views, both ways."""
    a_cropped = views_a @ views_b[0]
    b_cropped = views_b @ views_a[0]
    return float(np.clip(max(a_cropped.max(), b_cropped.max()), 0.0, 1.0))


def confirmation_score(image_a: Image.Image, image_b: Image.Image) -> float:
    """Pixel similarity of two images in [0, 1], independent of their pHashes: the highest
    normalised cross-correlation of their colour thumbnails over small border crops of
    either image. Duplicates (resized, recompressed, trimmed, stamped, brightened) score
    about 0.97-1.0; a pair is confirmed at CONFIRMATION_THRESHOLD or above."""
    side = _comparison_side(image_a.size, image_b.size)
    return _aligned_correlation(confirmation_views(image_a, side), confirmation_views(image_b, side))


def confirmation_scores(images: Sequence[Image.Image], pairs_i: np.ndarray, pairs_j: np.ndarray) -> np.ndarray:
    """``confirmation_score`` for each pair (images[i], images[j]). Views are kept for the
    most recently used images only (up to ~1 MB each), so pairs sorted by ``i``, as
    ``find_near_duplicates`` returns them, reuse them without holding a whole partition's."""
    views: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def views_of(position: int, side: int) -> np.ndarray:
        key = (position, side)
        if key in views:
            views.move_to_end(key)
        else:
            views[key] = confirmation_views(images[position], side)
            if len(views) > _CONFIRMATION_VIEWS_KEPT:
                views.popitem(last=False)
        return views[key]

    scores = np.empty(len(pairs_i), dtype=np.float32)
    for number, (first, second) in enumerate(zip(np.asarray(pairs_i).tolist(), np.asarray(pairs_j).tolist())):
        side = _comparison_side(images[first].size, images[second].size)
        scores[number] = _aligned_correlation(views_of(first, side), views_of(second, side))
    return scores
