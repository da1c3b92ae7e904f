"""Near-duplicate search is exact against brute force; clusters, canonical rule, and the
pixel confirmation score behave as the dedup stage relies on."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

from pipelines.dedup.confirmation import CONFIRMATION_THRESHOLD, confirmation_score, confirmation_scores
from pipelines.dedup.near_duplicates import (
    Band,
    choose_canonical,
    connected_components,
    find_near_duplicates,
    find_near_duplicates_between,
    hamming_distance,
    plan_bands,
    popcount64,
)

OPENCLIPART = Path("/usr/share/openclipart/png")


# ---------------------------------------------------------------------------------------
# Pair search


def brute_force_pairs(hashes: np.ndarray, max_distance: int) -> set[tuple[int, int, int]]:
    """Reference: every pair compared, bits counted with unpackbits (not the module's code)."""
    pairs = set()
    for start in range(0, len(hashes), 256):
        rows = np.arange(start, min(start + 256, len(hashes)))
        xor = hashes[rows, None] ^ hashes[None, :]
        distance = np.unpackbits(xor[..., None].view(np.uint8), axis=-1).sum(axis=-1)
        row, column = np.nonzero((distance <= max_distance) & (np.arange(len(hashes)) > rows[:, None]))
        pairs.update(zip(rows[row].tolist(), column.tolist(), distance[row, column].tolist()))
    return pairs


def as_set(pairs) -> set[tuple[int, int, int]]:
    return set(zip(pairs.i.tolist(), pairs.j.tolist(), pairs.distance.tolist()))


def hashes_with_planted_pairs(count: int, seed: int) -> np.ndarray:
    """Random hashes, plus copies with 0..16 flipped bits, exact repeats, and one dense
    cluster (a big group of identical band values, as blank images produce)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=count, dtype=np.uint64)
    copies = count // 5
    sources = rng.integers(0, count, size=copies)
    targets = rng.integers(0, count, size=copies)
    for source, target in zip(sources, targets):
        flipped = rng.choice(64, size=rng.integers(0, 17), replace=False)
        hashes[target] = hashes[source] ^ np.uint64(sum(1 << int(bit) for bit in flipped))
    cluster_base = hashes[0]
    for position in range(1, 40):
        flipped = rng.choice(64, size=rng.integers(0, 4), replace=False)
        hashes[position] = cluster_base ^ np.uint64(sum(1 << int(bit) for bit in flipped))
    return hashes


def layouts(max_distance: int) -> list[list[Band]]:
    """Band layouts from 1 to 6 bands whose radii just satisfy the pigeonhole bound."""
    result = []
    for band_count in range(1, min(max_distance + 1, 6) + 1):
        width, extra_bits = divmod(64, band_count)
        widths = [width + 1] * extra_bits + [width] * (band_count - extra_bits)
        radius, extra_radius = divmod(max_distance + 1 - band_count, band_count)
        radii = [radius + 1] * extra_radius + [radius] * (band_count - extra_radius)
        bands, shift = [], 64
        for band_width, band_radius in zip(widths, radii):
            shift -= band_width
            bands.append(Band(shift=shift, width=band_width, radius=band_radius))
        if all(band.pattern_count() <= 5000 for band in bands):
            result.append(bands)
    return result


@pytest.fixture(scope="module")
def planted_hashes() -> np.ndarray:
    return hashes_with_planted_pairs(1500, seed=11)


@pytest.mark.parametrize("max_distance", [0, 1, 4, 7, 10, 16])
def test_every_band_layout_finds_exactly_the_brute_force_pairs(planted_hashes, max_distance):
    expected = brute_force_pairs(planted_hashes, max_distance)
    assert expected, "the planted data must contain pairs"
    for bands in layouts(max_distance):
        found = find_near_duplicates(planted_hashes, max_distance, bands=bands)
        assert as_set(found) == expected, f"layout {bands}"
        assert len(found.i) == len(expected), "a pair was reported twice"


@pytest.mark.parametrize("max_distance", [0, 4, 10])
def test_planned_search_matches_brute_force(planted_hashes, max_distance):
    found = find_near_duplicates(planted_hashes, max_distance)
    assert as_set(found) == brute_force_pairs(planted_hashes, max_distance)
    assert np.all(found.i < found.j)
    assert np.all(np.diff(found.i) >= 0), "pairs are sorted by i"


def test_band_search_on_larger_input_matches_brute_force():
    # Large enough that the planner chooses bands with multi-member groups.
    hashes = hashes_with_planted_pairs(5000, seed=5)
    assert plan_bands(10, len(hashes)) is not None
    found = find_near_duplicates(hashes, 10, workers=2)
    assert as_set(found) == brute_force_pairs(hashes, 10)


def test_wide_bands_use_sorted_lookup_and_stay_exact(planted_hashes):
    bands = [Band(shift=32, width=32, radius=1), Band(shift=0, width=32, radius=1)]
    found = find_near_duplicates(planted_hashes, 3, bands=bands)
    assert as_set(found) == brute_force_pairs(planted_hashes, 3)


def test_large_groups_of_identical_hashes():
    rng = np.random.default_rng(3)
    hashes = np.concatenate([np.full(300, 0xDEADBEEF, dtype=np.uint64), rng.integers(0, 2**64, 200, dtype=np.uint64)])
    hashes[300:320] = np.uint64(0xDEADBEEF) ^ np.uint64(1 << 40)
    rng.shuffle(hashes)
    found = find_near_duplicates(hashes, 2, bands=[Band(0, 21, 0), Band(21, 21, 0), Band(42, 22, 0)])
    assert as_set(found) == brute_force_pairs(hashes, 2)
    assert len(found.i) == 320 * 319 // 2


def test_layout_that_cannot_guarantee_exactness_is_refused(planted_hashes):
    with pytest.raises(ValueError, match="cannot guarantee"):
        find_near_duplicates(planted_hashes, 4, bands=[Band(32, 32, 1), Band(0, 32, 1)])
    with pytest.raises(ValueError, match="overlaps"):
        find_near_duplicates(planted_hashes, 1, bands=[Band(0, 40, 0), Band(30, 34, 1)])
    with pytest.raises(ValueError, match="max_distance"):
        find_near_duplicates(planted_hashes, 64)


def test_empty_and_single_inputs():
    for hashes in (np.zeros(0, dtype=np.uint64), np.ones(1, dtype=np.uint64)):
        found = find_near_duplicates(hashes, 10)
        assert len(found.i) == len(found.j) == len(found.distance) == 0


def test_incremental_search_finds_new_old_and_new_new_pairs_only(planted_hashes):
    old, new = planted_hashes[:1100], planted_hashes[1100:]
    everything = brute_force_pairs(planted_hashes, 8)
    expected = {(i, j, d) for i, j, d in everything if j >= len(old)}
    assert len(expected) < len(everything), "the data must contain old-old pairs to leave out"
    found = find_near_duplicates_between(new, old, 8)
    assert as_set(found) == expected
    for bands in layouts(8)[:3]:
        assert as_set(find_near_duplicates_between(new, old, 8, bands=bands)) == expected


def test_incremental_search_with_a_big_catalog_and_few_new_images():
    rng = np.random.default_rng(8)
    old = rng.integers(0, 2**64, size=20_000, dtype=np.uint64)
    new = rng.integers(0, 2**64, size=50, dtype=np.uint64)
    new[:10] = old[:10] ^ np.uint64(0b1011)  # 3 bits from an old image
    new[10] = new[11] ^ np.uint64(1 << 63)
    found = find_near_duplicates_between(new, old, 6)
    pairs = set(zip(found.i.tolist(), found.j.tolist()))
    assert {(k, 20_000 + k) for k in range(10)} <= pairs
    assert (20_010, 20_011) in pairs
    all_pairs = brute_force_pairs(np.concatenate([old[:10], new]), 6)  # old[10:] is random
    expected = {(i if i < 10 else i - 10 + 20_000, j - 10 + 20_000, d) for i, j, d in all_pairs if j >= 10}
    assert as_set(found) >= expected


def test_popcount_and_hamming_distance():
    rng = np.random.default_rng(1)
    values = rng.integers(0, 2**64, size=1000, dtype=np.uint64)
    assert popcount64(values).tolist() == [bin(int(value)).count("1") for value in values]
    assert popcount64(np.array([0, 2**64 - 1], dtype=np.uint64)).tolist() == [0, 64]
    assert hamming_distance(values[:, None], values[None, :5]).shape == (1000, 5)


# ---------------------------------------------------------------------------------------
# Clusters and canonical image


def test_connected_components_merge_chains_and_keep_singletons():
    labels = connected_components(7, np.array([0, 1, 4]), np.array([1, 3, 5]))
    assert labels[0] == labels[1] == labels[3]
    assert labels[4] == labels[5]
    assert len({labels[0], labels[2], labels[4], labels[6]}) == 4


def test_canonical_prefers_resolution_then_earliest_then_smallest_id():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 3, 3])
    width = np.array([100, 200, 200, 50, 50, 50, 10, 300, 300])
    height = np.array([100, 100, 100, 50, 50, 50, 10, 300, 300])
    fetched_at = np.array(
        ["2024-01-03", "2024-01-02", "2024-01-01", "2024-01-05", "2024-01-04", "2024-01-04", "2024-01-01",
         "2024-01-01", "2024-01-01"],
        dtype="datetime64[s]",
    )
    image_id = np.array(["a", "b", "c", "d", "f", "e", "g", "i", "h"])
    canonical = choose_canonical(labels, width, height, fetched_at, image_id)
    # cluster 0: largest area (200x100) twice; the earlier fetch (c) wins
    assert canonical[:3].tolist() == [2, 2, 2]
    # cluster 1: same area; earliest fetch is shared by f and e; the smaller id (e) wins
    assert canonical[3:6].tolist() == [5, 5, 5]
    # singleton is its own canonical image
    assert canonical[6] == 6
    # full tie on area and time: smallest id (h)
    assert canonical[7:].tolist() == [8, 8]


def test_canonical_with_numeric_ids_and_timestamps():
    labels = np.array([5, 5, 9])
    canonical = choose_canonical(labels, [10, 10, 1], [10, 10, 1], [7.0, 7.0, 1.0], [42, 17, 3])
    assert canonical.tolist() == [1, 1, 2]


# ---------------------------------------------------------------------------------------
# Confirmation score


@pytest.fixture(scope="module")
def drawings() -> list[Image.Image]:
    paths = sorted((OPENCLIPART / "food").rglob("*.png")) + sorted((OPENCLIPART / "tools").rglob("*.png"))
    if not paths:
        pytest.skip("openclipart-png is not installed (apt-get install openclipart-png)")
    random.Random(2).shuffle(paths)
    images = []
    for path in paths:
        drawing = Image.open(path)
        if drawing.width * drawing.height > 1_500_000 or min(drawing.size) < 120:
            continue
        drawing = drawing.convert("RGBA")
        background = Image.new("RGBA", drawing.size, (255, 255, 255, 255))
        background.alpha_composite(drawing)
        images.append(reencoded(background.convert("RGB"), 90))
        if len(images) == 12:
            break
    return images


def reencoded(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def copies_of(image: Image.Image) -> dict[str, Image.Image]:
    width, height = image.size
    dx, dy = round(width * 0.03), round(height * 0.03)
    # A small semi-transparent shop name in a corner, as resellers stamp photos.
    stamp = Image.new("RGBA", image.size, (0, 0, 0, 0))
    font_size = max(8, round(min(image.size) * 0.06))
    font = ImageFont.load_default(size=font_size)
    ImageDraw.Draw(stamp).text((4, height - 2 * font_size), "(c) shop24", font=font, fill=(90, 90, 90, 170))
    stamped = image.convert("RGBA")
    stamped.alpha_composite(stamp)
    stamped = stamped.convert("RGB")
    return {
        "resize_50": image.resize((width // 2, height // 2), Image.LANCZOS),
        "jpeg_q45": reencoded(image, 45),
        "crop_3pct": image.crop((dx, dy, width - dx, height - dy)),
        "watermark": stamped,
        "brightness_8pct": ImageEnhance.Brightness(image).enhance(1.08),
    }


def test_transformed_copies_are_confirmed(drawings):
    for drawing in drawings[:6]:
        for transform, copy in copies_of(drawing).items():
            score = confirmation_score(drawing, copy)
            assert score >= CONFIRMATION_THRESHOLD, f"{transform}: {score:.3f}"


def test_different_drawings_are_not_confirmed(drawings):
    scores = [confirmation_score(a, b) for a, b in zip(drawings[:-1], drawings[1:])]
    assert max(scores) < CONFIRMATION_THRESHOLD, scores
    assert all(0.0 <= score <= 1.0 for score in scores)


def test_colour_variant_is_not_a_duplicate(drawings):
    # The same drawing with red and blue swapped: pHash (grayscale) cannot tell them apart,
    # the confirmation must (another colour is another product).
    drawing = max(drawings, key=lambda image: np.asarray(image, dtype=np.float32).std(axis=2).mean())
    red, green, blue = drawing.split()
    swapped = Image.merge("RGB", (blue, green, red))
    assert confirmation_score(drawing, swapped) < CONFIRMATION_THRESHOLD


def test_batch_scores_equal_single_scores(drawings):
    images = drawings[:4] + [copies_of(drawings[0])["crop_3pct"]]
    first, second = np.array([0, 0, 1, 2]), np.array([4, 1, 2, 3])
    batch = confirmation_scores(images, first, second)
    single = [confirmation_score(images[a], images[b]) for a, b in zip(first, second)]
    np.testing.assert_allclose(batch, single, rtol=1e-6)
    assert confirmation_score(images[0], images[4]) == pytest.approx(confirmation_score(images[4], images[0]))
