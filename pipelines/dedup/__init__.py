"""Dedup stage: exact duplicates by sha256, near duplicates by pHash confirmed pixel by pixel.

Public: `run_dedup` (the stage), `DedupSummary`, `DedupError`, `with_valid_canonicals` (the
canonical-image rule later stages apply after validation), `HASH_VERSION`. Modules:
stage (driver and Spark tasks), phash, near_duplicates (search, clusters, confirmation),
folder_tools (`catalog-index hash` / `near-duplicates` on any folder).
"""
from pipelines.dedup.stage import (
    HASH_VERSION,
    DedupError,
    DedupSummary,
    run_dedup,
    with_valid_canonicals,
)

__all__ = ["HASH_VERSION", "DedupError", "DedupSummary", "run_dedup", "with_valid_canonicals"]
