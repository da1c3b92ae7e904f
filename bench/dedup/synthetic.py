"""Synthetic pHashes for the pair-search benchmarks (run.py, search_only.py)."""

from __future__ import annotations

import numpy as np


def synthetic_hashes(count: int, seed: int = 7) -> np.ndarray:
    """Uniform random 64-bit hashes; 1% are copies of an earlier hash with 0-10 bits
    flipped, so that every prefix (the smaller sizes) has true near pairs to find."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=count, dtype=np.uint64)
    copies = max(1, count // 100)
    targets = np.sort(rng.choice(np.arange(1, count), size=copies, replace=False))
    sources = (rng.random(copies) * targets).astype(np.int64)
    flips = np.zeros(copies, dtype=np.uint64)
    for row, flipped in enumerate(rng.integers(0, 11, size=copies)):
        for bit in rng.choice(64, size=flipped, replace=False):
            flips[row] |= np.uint64(1) << np.uint64(bit)
    hashes[targets] = hashes[sources] ^ flips
    return hashes
