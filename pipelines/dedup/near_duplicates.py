"""Near-duplicate images: exact Hamming pair search over pHashes, clusters, canonical choice.
The pixel-level confirmation of candidate pairs is in pipelines.dedup.confirmation.

Pair search is exact: it returns every pair within ``max_distance`` bits, the same set as
comparing all pairs, but without comparing all pairs. It uses multi-index hashing: the
64 bits are cut into disjoint bands and band ``k`` gets a radius ``r_k`` with
``sum(r_k + 1) > max_distance``. If two hashes differed by more than ``r_k`` bits in every
band they would differ by more than ``max_distance`` bits in all, so every pair within
``max_distance`` lies within ``r_k`` of each other in at least one band (pigeonhole). Per band,
hashes are sorted into groups of equal band value; every hash is looked up in the groups
whose value differs from its own by a "flip pattern" of at most ``r_k`` bits (XOR with a
dense value -> group table), and every candidate pair is verified on all 64 bits. A pair
is reported only by the first band that can find it, so nothing is reported twice. The
band layout is chosen by a cost model (more bands: fewer flip patterns but more
candidates); small inputs are compared directly. All of it is numpy array work, spread
over threads (numpy releases the GIL).

Everything here is pure computation on arrays: no I/O, no Spark. The module is
longer than 500 lines because the search is one algorithm whose parts (band planning, grouping by band
value, joining flip patterns, brute force for small inputs) share private helpers and cost
constants; cutting it would scatter one idea over several files.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

HASH_BITS = 64

# pHash distance up to which the dedup stage takes pairs as candidates. Wider than
# imagededup's 10: the confirmation score, not the pHash distance, decides, and a 3% border
# crop alone moves the pHash by 10-16 bits on many images: on the tuning sets 14 bits kept
# 93-96% of the cropped copies as candidates, 16 bits 96-98%, for ~1.8x the candidates
# (bench/dedup/README.md).
CANDIDATE_MAX_DISTANCE = 16

# Bands up to this width use a dense value -> group table (2**24 int32 = 64 MiB at most);
# wider bands look groups up by binary search.
_DENSE_TABLE_MAX_WIDTH = 24
# Candidate pairs are materialised in chunks of about this many, to bound memory.
_CANDIDATE_CHUNK = 1 << 22
# Flip patterns per thread task: enough array work per task to hide Python overhead.
_PATTERNS_PER_TASK = 64
# Group members joined one vectorised round each; larger groups are expanded in blocks.
_MEMBER_ROUNDS = 8

# Costs (ns) for the band planner, measured with numpy 1.26 on the 2-core dev machine.
# Only their ratios matter: they decide between fewer/wider and more/narrower bands.
_COST_DENSE_LOOKUP = 11.0  # per hash and flip pattern: XOR, table gather, hit test
_COST_SORTED_LOOKUP = 80.0  # the same by binary search, for bands wider than the table
_COST_HIT = 45.0  # per hash whose flipped value exists: gathers and popcount
_COST_CANDIDATE = 35.0  # per further group member
_COST_PER_PATTERN = 30_000.0
_COST_PER_BAND = 2_000_000.0  # sorting, tables, thread tasks
_COST_PER_TABLE_SLOT = 2.0
_COST_BRUTE_FORCE_PAIR = 15.0

_POPCOUNT_16 = np.array([bin(value).count("1") for value in range(1 << 16)], dtype=np.uint8)


class NearDuplicatePairs(NamedTuple):
    """Pairs of positions ``i < j`` whose hashes differ in ``distance`` bits."""

    i: np.ndarray  # int64
    j: np.ndarray  # int64
    distance: np.ndarray  # uint8


@dataclass(frozen=True)
class Band:
    """Bits ``[shift, shift + width)`` of the hash, searched up to ``radius`` flipped bits."""

    shift: int
    width: int
    radius: int

    @property
    def mask(self) -> np.uint64:
        return np.uint64((1 << self.width) - 1)

    def values(self, hashes: np.ndarray) -> np.ndarray:
        return (hashes >> np.uint64(self.shift)) & self.mask

    def flip_patterns(self) -> np.ndarray:
        """Every XOR pattern of at most ``radius`` bits within the band, 0 first."""
        patterns = [0]
        for flipped in range(1, self.radius + 1):
            for bits in itertools.combinations(range(self.width), flipped):
                patterns.append(sum(1 << bit for bit in bits))
        return np.array(patterns, dtype=np.uint64)

    def pattern_count(self) -> int:
        return sum(math.comb(self.width, flipped) for flipped in range(self.radius + 1))


# --------------------------------------------------------------------------------------
# Hamming distance


def popcount64(values: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64, as uint8 (numpy 1.26 has no bitwise_count)."""
    values = np.asarray(values, dtype=np.uint64)
    halves = np.ascontiguousarray(values).reshape(-1).view(np.uint16)
    counts = _POPCOUNT_16[halves[0::4]]
    counts += _POPCOUNT_16[halves[1::4]]
    counts += _POPCOUNT_16[halves[2::4]]
    counts += _POPCOUNT_16[halves[3::4]]
    return counts.reshape(values.shape)


def hamming_distance(hashes_a: np.ndarray, hashes_b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between uint64 hashes (broadcasting), as uint8."""
    return popcount64(np.bitwise_xor(np.asarray(hashes_a, np.uint64), np.asarray(hashes_b, np.uint64)))


# --------------------------------------------------------------------------------------
# Band planning


def _layout(widths: Sequence[int], radii: Sequence[int]) -> list[Band]:
    bands, shift = [], HASH_BITS
    for width, radius in zip(widths, radii):
        shift -= width
        bands.append(Band(shift=shift, width=width, radius=radius))
    return bands


def _candidate_layouts(max_distance: int) -> Iterator[list[Band]]:
    """Band layouts whose radii sum to the minimum the pigeonhole argument needs
    (sum(radius + 1) = max_distance + 1), radii as even as possible, and for each a few
    ways to share the 64 bits: bands with the smaller radius may be narrower (their flip
    patterns are few, so denser groups cost less there)."""
    for band_count in range(1, min(max_distance + 1, HASH_BITS) + 1):
        base_radius, larger = divmod(max_distance + 1 - band_count, band_count)
        radii = [base_radius + 1] * larger + [base_radius] * (band_count - larger)
        smaller = band_count - larger
        even_width = HASH_BITS // band_count
        narrow_options = range(max(1, even_width - 8), even_width + 1) if 0 < larger < band_count else [None]
        for narrow in narrow_options:
            if narrow is None:
                wide, extra = divmod(HASH_BITS, band_count)
                widths = [wide + 1] * extra + [wide] * (band_count - extra)
            else:
                wide, extra = divmod(HASH_BITS - narrow * smaller, larger)
                widths = [wide + 1] * extra + [wide] * (larger - extra) + [narrow] * smaller
            yield _layout(widths, radii)


def _band_plan_cost(bands: Sequence[Band], query_count: int, table_count: int, self_join: bool) -> float:
    """Estimated ns for a band join, assuming uniformly spread hashes."""
    cost = 0.0
    for band in bands:
        cost += _COST_PER_BAND + min(1 << band.width, table_count) * _COST_PER_TABLE_SLOT
        patterns = band.pattern_count()
        if patterns > 1_000_000:
            return math.inf
        slots = float(1 << band.width)
        per_slot = table_count / slots
        occupied = -math.expm1(-per_slot)
        lookup = _COST_DENSE_LOOKUP if band.width <= _DENSE_TABLE_MAX_WIDTH else _COST_SORTED_LOOKUP
        # A self join looks up only the half of the hashes on the low side of each pattern.
        left = query_count / 2 if self_join else query_count
        per_pattern = _COST_PER_PATTERN + left * (lookup + occupied * _COST_HIT + (per_slot - occupied) * _COST_CANDIDATE)
        cost += (patterns - 1 if self_join else patterns) * per_pattern
        if self_join:  # pattern 0: pairs inside each group
            cost += query_count * per_slot / 2 * _COST_CANDIDATE
    return cost


def plan_bands(max_distance: int, query_count: int, table_count: int | None = None) -> list[Band] | None:
    """Cheapest band layout for a search of ``query_count`` hashes against ``table_count``
    (None: against themselves), or None when comparing all pairs directly is cheaper.

    The model assumes uniformly spread hashes; it only has to pick a reasonable layout,
    exactness does not depend on it."""
    _check_distance(max_distance)
    self_join = table_count is None
    table_count = query_count if self_join else table_count
    brute_force_pairs = query_count * table_count / (2 if self_join else 1)
    best_cost, best_bands = brute_force_pairs * _COST_BRUTE_FORCE_PAIR, None
    for bands in _candidate_layouts(max_distance):
        cost = _band_plan_cost(bands, query_count, table_count, self_join)
        if cost < best_cost:
            best_cost, best_bands = cost, bands
    return best_bands


def _check_distance(max_distance: int) -> None:
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"max_distance must be between 0 and {HASH_BITS - 1}, got {max_distance}")


def _check_bands(bands: Sequence[Band], max_distance: int) -> None:
    covered = 0
    for band in bands:
        if band.width < 1 or band.shift < 0 or band.shift + band.width > HASH_BITS or band.radius < 0:
            raise ValueError(f"band {band} does not fit in {HASH_BITS} bits")
        bits = ((1 << band.width) - 1) << band.shift
        if covered & bits:
            raise ValueError(f"band {band} overlaps another band")
        covered |= bits
    if sum(band.radius + 1 for band in bands) <= max_distance:
        raise ValueError(
            f"bands {list(bands)} cannot guarantee every pair within {max_distance} bits: "
            "sum(radius + 1) over bands must exceed max_distance"
        )


# --------------------------------------------------------------------------------------
# Grouping by band value and joining hashes to groups


class _BandIndex:
    """Hashes sorted by one band's value; equal values form a group.

    ``first_of(values)`` gives the sorted position of the group holding each value (-1 if
    none) and ``group_size[position]`` that group's size.
    """

    def __init__(self, hashes: np.ndarray, band: Band):
        band_values = band.values(hashes)
        if band.width < HASH_BITS:
            band_values = band_values.astype(np.int64)  # int64 indexes tables without a copy
        self.order = np.argsort(band_values, kind="stable")
        self.sorted_values = band_values[self.order]
        self.sorted_hashes = hashes[self.order]
        is_start = np.empty(len(self.sorted_values), dtype=bool)
        is_start[:1] = True
        np.not_equal(self.sorted_values[1:], self.sorted_values[:-1], out=is_start[1:])
        self.group_starts = np.flatnonzero(is_start)
        self.group_sizes = np.diff(np.append(self.group_starts, len(self.sorted_values)))
        self.group_size = np.zeros(len(self.sorted_values), dtype=np.int32)
        self.group_size[self.group_starts] = self.group_sizes
        self.max_group_size = int(self.group_sizes.max()) if len(self.group_sizes) else 0
        self._dense = None
        if band.width <= _DENSE_TABLE_MAX_WIDTH:
            position_type = np.int32 if len(hashes) < 2**31 else np.int64  # half the cache footprint
            self._dense = np.full(1 << band.width, -1, dtype=position_type)
            self._dense[self.sorted_values[self.group_starts]] = self.group_starts
        else:
            self._group_values = self.sorted_values[self.group_starts]

    def first_of(self, wanted: np.ndarray) -> np.ndarray:
        if self._dense is not None:
            return self._dense[wanted]
        if len(self._group_values) == 0:
            return np.full(len(wanted), -1, dtype=np.int64)
        found = np.searchsorted(self._group_values, wanted)
        found[found == len(self._group_values)] = 0
        return np.where(self._group_values[found] == wanted, self.group_starts[found], -1)


def _within_distance(xor: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions where popcount(xor) <= max_distance, and those popcounts.

    Counts 32 bits first and finishes only the few survivors: nearly every candidate of a
    band join is already too far apart on half the bits."""
    halves = np.ascontiguousarray(xor, dtype=np.uint64).view(np.uint16)
    partial = _POPCOUNT_16[halves[0::4]]
    partial += _POPCOUNT_16[halves[1::4]]
    maybe = np.flatnonzero(partial <= max_distance)
    distance = partial[maybe]
    distance += _POPCOUNT_16[halves[2::4][maybe]]
    distance += _POPCOUNT_16[halves[3::4][maybe]]
    keep = np.flatnonzero(distance <= max_distance)
    return maybe[keep], distance[keep]


def _split_large_blocks(left_start, left_count, right_start, right_count):
    """Cut blocks of more than _CANDIDATE_CHUNK pairs into slices of left rows."""
    sizes = left_count * right_count
    if len(sizes) == 0 or sizes.max() <= _CANDIDATE_CHUNK:
        return left_start, left_count, right_start, right_count
    rows_per_slice = np.maximum(1, _CANDIDATE_CHUNK // np.maximum(right_count, 1))
    slices = -(-left_count // rows_per_slice)
    block = np.repeat(np.arange(len(sizes)), slices)
    slice_number = np.arange(len(block)) - np.repeat(np.cumsum(slices) - slices, slices)
    first_row = slice_number * rows_per_slice[block]
    return (
        left_start[block] + first_row,
        np.minimum(rows_per_slice[block], left_count[block] - first_row),
        right_start[block],
        right_count[block],
    )


def _expand_blocks(left_start, left_count, right_start, right_count) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield every (left, right) pair of each rectangular block of positions, in chunks."""
    left_start, left_count, right_start, right_count = _split_large_blocks(
        left_start, left_count, right_start, right_count
    )
    sizes = left_count * right_count
    ends = np.cumsum(sizes)
    first = 0
    while first < len(sizes):
        base = ends[first] - sizes[first]
        last = max(int(np.searchsorted(ends, base + _CANDIDATE_CHUNK, side="right")), first + 1)
        chunk_sizes = sizes[first:last]
        owner = np.repeat(np.arange(first, last), chunk_sizes)
        offset = np.arange(len(owner), dtype=np.int64) - (np.repeat(ends[first:last] - chunk_sizes, chunk_sizes) - base)
        width = right_count[owner]
        yield left_start[owner] + offset // width, right_start[owner] + offset % width
        first = last


def _join_to_groups(
    left_hashes: np.ndarray,
    left_ids: np.ndarray,
    wanted_values: np.ndarray,
    index: _BandIndex,
    max_distance: int,
) -> list[tuple]:
    """Verified pairs between each left hash and every member of the group holding its
    ``wanted_values`` entry: (left id, input position in ``index``, distance)."""
    found = []
    first = index.first_of(wanted_values)
    left = np.flatnonzero(first >= 0)
    right = first[left]
    member = 0
    # Member by member: groups are small at the densities the planner picks, so each
    # round is one vectorised pass over the pairs whose group is that large.
    while len(left):
        if member == _MEMBER_ROUNDS:
            counts = index.group_size[right] - member
            blocks = (left, np.ones_like(left), right + member, counts)
            for rows, columns in _expand_blocks(*blocks):
                close, distance = _within_distance(left_hashes[rows] ^ index.sorted_hashes[columns], max_distance)
                found.append((left_ids[rows[close]], index.order[columns[close]], distance))
            break
        members = right + member if member else right
        close, distance = _within_distance(left_hashes[left] ^ index.sorted_hashes[members], max_distance)
        if len(close):
            found.append((left_ids[left[close]], index.order[members[close]], distance))
        member += 1
        if index.max_group_size <= member:
            break
        larger = np.flatnonzero(index.group_size[right] > member)
        left, right = left[larger], right[larger]
    return found


def _self_join_inside_groups(index: _BandIndex, max_distance: int) -> list[tuple]:
    """Pattern 0 of a self join: every pair p < q inside one group."""
    multi = index.group_sizes > 1
    starts, sizes = index.group_starts[multi], index.group_sizes[multi]
    rows_per_group = sizes - 1
    group = np.repeat(np.arange(len(starts)), rows_per_group)
    row = np.arange(len(group)) - np.repeat(np.cumsum(rows_per_group) - rows_per_group, rows_per_group)
    left = starts[group] + row
    found = []
    for rows, columns in _expand_blocks(left, np.ones_like(left), left + 1, sizes[group] - row - 1):
        close, distance = _within_distance(index.sorted_hashes[rows] ^ index.sorted_hashes[columns], max_distance)
        found.append((index.order[rows[close]], index.order[columns[close]], distance))
    return found


def _self_join_patterns(index: _BandIndex, top_bit, patterns: np.ndarray, max_distance: int) -> list[tuple]:
    """Pairs between band values ``v`` and ``v ^ f`` for patterns ``f`` whose highest set
    bit is ``top_bit``. Each pair is found once, from the hash whose value has that bit
    clear."""
    low_side = np.flatnonzero(((index.sorted_values >> top_bit) & 1) == 0)
    low_values = index.sorted_values[low_side]
    low_hashes = index.sorted_hashes[low_side]
    low_ids = index.order[low_side]
    wanted = np.empty_like(low_values)
    found = []
    for pattern in patterns:
        np.bitwise_xor(low_values, pattern, out=wanted)
        found.extend(_join_to_groups(low_hashes, low_ids, wanted, index, max_distance))
    return found


def _cross_join_patterns(
    query_hashes: np.ndarray, query_values: np.ndarray, index: _BandIndex, patterns: np.ndarray, max_distance: int
) -> list[tuple]:
    query_ids = np.arange(len(query_hashes))
    found = []
    for pattern in patterns:
        found.extend(_join_to_groups(query_hashes, query_ids, query_values ^ pattern, index, max_distance))
    return found


def _pattern_batches(patterns: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Flip patterns grouped by highest set bit, cut into batches of about
    _PATTERNS_PER_TASK so that worker threads share the work evenly."""
    top_bits = np.array([int(pattern).bit_length() - 1 for pattern in patterns], dtype=np.int64)
    batches = []
    for top_bit in np.unique(top_bits):
        same_top = patterns[top_bits == top_bit]
        for first in range(0, len(same_top), _PATTERNS_PER_TASK):
            batches.append((int(top_bit), same_top[first : first + _PATTERNS_PER_TASK]))
    return batches


def _band_self_join(hashes: np.ndarray, band: Band, max_distance: int, executor: Executor) -> list[tuple]:
    """Pairs of ``hashes`` within ``max_distance`` whose band values are within
    ``band.radius``; each unordered pair once."""
    index = _BandIndex(hashes, band)
    value_type = index.sorted_values.dtype.type
    tasks = [executor.submit(_self_join_inside_groups, index, max_distance)]
    patterns = band.flip_patterns()[1:].astype(index.sorted_values.dtype)
    for top_bit, batch in _pattern_batches(patterns):
        tasks.append(executor.submit(_self_join_patterns, index, value_type(top_bit), batch, max_distance))
    return [found for task in tasks for found in task.result()]


def _band_cross_join(
    queries: np.ndarray, table: np.ndarray, band: Band, max_distance: int, executor: Executor
) -> list[tuple]:
    """Pairs (query position, table position) within ``max_distance`` whose band values are
    within ``band.radius``."""
    index = _BandIndex(table, band)
    query_values = band.values(queries).astype(index.sorted_values.dtype)
    patterns = band.flip_patterns().astype(index.sorted_values.dtype)
    tasks = [
        executor.submit(
            _cross_join_patterns, queries, query_values, index, patterns[first : first + _PATTERNS_PER_TASK], max_distance
        )
        for first in range(0, len(patterns), _PATTERNS_PER_TASK)
    ]
    return [found for task in tasks for found in task.result()]


def _first_band_only(pairs_a, pairs_b, band_index: int, bands: Sequence[Band]):
    """Keep pairs that no earlier band can find, so that each pair is reported once."""
    keep = np.ones(len(pairs_a), dtype=bool)
    for earlier in bands[:band_index]:
        within = popcount64(earlier.values(pairs_a) ^ earlier.values(pairs_b)) <= earlier.radius
        keep &= ~within
    return keep


def _brute_force_self(hashes: np.ndarray, max_distance: int) -> Iterator[tuple]:
    count = len(hashes)
    rows_per_chunk = max(1, _CANDIDATE_CHUNK // max(count, 1))
    for first in range(0, count, rows_per_chunk):
        rows = np.arange(first, min(first + rows_per_chunk, count))
        distance = hamming_distance(hashes[rows, None], hashes[None, :])
        row, column = np.nonzero((distance <= max_distance) & (np.arange(count)[None, :] > rows[:, None]))
        yield rows[row], column, distance[row, column]


def _brute_force_cross(queries: np.ndarray, table: np.ndarray, max_distance: int) -> Iterator[tuple]:
    rows_per_chunk = max(1, _CANDIDATE_CHUNK // max(len(table), 1))
    for first in range(0, len(queries), rows_per_chunk):
        rows = np.arange(first, min(first + rows_per_chunk, len(queries)))
        distance = hamming_distance(queries[rows, None], table[None, :])
        row, column = np.nonzero(distance <= max_distance)
        yield rows[row], column, distance[row, column]


def _collect(found) -> NearDuplicatePairs:
    parts = list(found)
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return NearDuplicatePairs(empty, empty.copy(), np.zeros(0, dtype=np.uint8))
    first, second, distance = (np.concatenate(column) for column in zip(*parts))
    return NearDuplicatePairs(first.astype(np.int64), second.astype(np.int64), distance.astype(np.uint8))


def _sorted_pairs(i: np.ndarray, j: np.ndarray, distance: np.ndarray) -> NearDuplicatePairs:
    order = np.lexsort((j, i))
    return NearDuplicatePairs(i[order], j[order], distance[order])


def _as_hashes(hashes) -> np.ndarray:
    array = np.asarray(hashes)
    if array.dtype != np.uint64:
        if array.dtype.kind not in "ui":
            raise TypeError(f"hashes must be unsigned 64-bit integers, got dtype {array.dtype}")
        array = array.astype(np.uint64)
    return np.ascontiguousarray(array.ravel())


def find_near_duplicates(
    hashes: np.ndarray,
    max_distance: int,
    *,
    bands: Sequence[Band] | None = None,
    workers: int | None = None,
) -> NearDuplicatePairs:
    """Every pair ``i < j`` with ``hamming(hashes[i], hashes[j]) <= max_distance``, sorted by
    (i, j), with its distance. Exact: the same pairs as comparing all pairs.

    ``bands`` overrides the planner's layout (tests use it to check every layout).
    ``workers``: threads (numpy releases the GIL in the array work); default: CPU count.
    """
    hashes = _as_hashes(hashes)
    _check_distance(max_distance)
    if bands is None:
        bands = plan_bands(max_distance, len(hashes))
    if bands is None:
        first, second, distance = _collect(_brute_force_self(hashes, max_distance))
        return _sorted_pairs(first, second, distance)
    _check_bands(bands, max_distance)
    parts = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as executor:
        for band_index, band in enumerate(bands):
            first, second, distance = _collect(_band_self_join(hashes, band, max_distance, executor))
            keep = _first_band_only(hashes[first], hashes[second], band_index, bands)
            parts.append((first[keep], second[keep], distance[keep]))
    first, second, distance = (np.concatenate(column) for column in zip(*parts))
    return _sorted_pairs(np.minimum(first, second), np.maximum(first, second), distance)


def find_near_duplicates_between(
    new_hashes: np.ndarray,
    old_hashes: np.ndarray,
    max_distance: int,
    *,
    bands: Sequence[Band] | None = None,
    workers: int | None = None,
) -> NearDuplicatePairs:
    """Pairs for an incremental run: new images against already deduplicated ones, and new
    against new; old pairs are never recomputed.

    Positions refer to ``concatenate([old_hashes, new_hashes])``, as if the new images were
    appended to the catalog: old image ``k`` is ``k``, new image ``k`` is ``len(old) + k``.
    The result equals ``find_near_duplicates`` on that concatenation minus the old-old pairs,
    so every pair has ``j >= len(old_hashes)``.
    """
    new_hashes, old_hashes = _as_hashes(new_hashes), _as_hashes(old_hashes)
    _check_distance(max_distance)
    offset = len(old_hashes)
    new_pairs = find_near_duplicates(new_hashes, max_distance, bands=bands, workers=workers)

    cross_bands = bands if bands is not None else plan_bands(max_distance, len(new_hashes), len(old_hashes))
    if cross_bands is None:
        new_position, old_position, distance = _collect(_brute_force_cross(new_hashes, old_hashes, max_distance))
    else:
        _check_bands(cross_bands, max_distance)
        parts = []
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as executor:
            for band_index, band in enumerate(cross_bands):
                found_new, found_old, found_distance = _collect(
                    _band_cross_join(new_hashes, old_hashes, band, max_distance, executor)
                )
                keep = _first_band_only(new_hashes[found_new], old_hashes[found_old], band_index, cross_bands)
                parts.append((found_new[keep], found_old[keep], found_distance[keep]))
        new_position, old_position, distance = (np.concatenate(column) for column in zip(*parts))
    return _sorted_pairs(
        np.concatenate([old_position, new_pairs.i + offset]),
        np.concatenate([new_position + offset, new_pairs.j + offset]),
        np.concatenate([distance, new_pairs.distance]),
    )


# --------------------------------------------------------------------------------------
# Clusters and the canonical image


def connected_components(count: int, pairs_i: np.ndarray, pairs_j: np.ndarray) -> np.ndarray:
    """Cluster label per item (0..count-1) from undirected pairs; an item without pairs is
    its own cluster. Labels are numbered in order of each cluster's first item."""
    pairs_i, pairs_j = np.asarray(pairs_i, dtype=np.int64), np.asarray(pairs_j, dtype=np.int64)
    graph = scipy.sparse.coo_matrix(
        (np.ones(len(pairs_i), dtype=np.int8), (pairs_i, pairs_j)), shape=(count, count)
    ).tocsr()
    _, labels = scipy.sparse.csgraph.connected_components(graph, directed=True, connection="weak")
    return labels.astype(np.int64)


def _rank(values) -> np.ndarray:
    """Dense rank of each value (works for numbers, datetimes and strings alike)."""
    _, inverse = np.unique(np.asarray(values), return_inverse=True)
    return inverse.ravel()


def choose_canonical(labels, width, height, fetched_at, image_id) -> np.ndarray:
    """Position of the canonical image of each item's cluster.

    Rule (documented in issue 4): the largest resolution (width * height) wins; ties go to
    the image seen first (smallest ``fetched_at``), then to the smallest ``image_id``.
    ``is_canonical = choose_canonical(...) == np.arange(n)``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    area = np.asarray(width, dtype=np.int64) * np.asarray(height, dtype=np.int64)
    # lexsort: last key is primary. Within a cluster the best image sorts first.
    order = np.lexsort((_rank(image_id), _rank(fetched_at), -area, labels))
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = labels[order][1:] != labels[order][:-1]
    canonical_of_label = np.empty(labels.max() + 1 if len(labels) else 0, dtype=np.int64)
    canonical_of_label[labels[order][is_first]] = order[is_first]
    return canonical_of_label[labels]
