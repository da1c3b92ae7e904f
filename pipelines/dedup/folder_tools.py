"""Standalone dedup commands that work on any folder of images (like imagededup's), or a manifest.

`hash_inputs` -> one row per file or URL: sha256, 64-bit pHash (imagehash.phash's hex),
size, or the reason it could not be hashed. `near_duplicate_pairs` -> every pair within
a Hamming distance, exact, optionally confirmed by the pixel-level check.
No Spark and no warehouse: these are tools for a laptop or a notebook.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.config import CrawlSettings
from pipelines.crawl import Fetcher, read_manifest
from pipelines.decode import IMAGE_SUFFIXES
from pipelines.dedup.confirmation import CONFIRMATION_THRESHOLD, confirmation_scores
from pipelines.dedup.near_duplicates import find_near_duplicates
from pipelines.dedup.phash import open_image, phash_hex, try_phash_many


def _hash_files(paths: list[str], draft_size: int | None = None) -> list[dict]:
    from PIL import Image

    warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
    blobs = [Path(p).read_bytes() for p in paths]
    hashes, reasons = try_phash_many(blobs, draft_size=draft_size)
    rows = []
    for path, data, h, reason in zip(paths, blobs, hashes.tolist(), reasons):
        width = height = None
        if reason is None:
            with Image.open(Path(path)) as image:
                width, height = image.size
        rows.append({"path": path, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                     "phash": None if reason else phash_hex(h), "width": width, "height": height, "reason": reason})
    return rows


def list_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def hash_inputs(source: str, download_dir: Path | None = None, crawl=None, workers: int | None = None,
                chunk: int = 64, progress=None, draft_size: int | None = None) -> pd.DataFrame:
    """Hash every image in a folder, or every image_url of a manifest (downloaded to
    `download_dir` first, with the crawler's safety rules in `crawl`). `draft_size`: see
    pipelines.phash (None: exact, equal to imagehash.phash)."""
    path = Path(source)
    urls: dict[str, str] = {}
    if path.is_dir():
        files = list_images(path)
    else:
        urls = download_manifest_images(source, download_dir or Path(f"{path.name}.images"), crawl)
        files = sorted(urls)
    chunks = [files[i:i + chunk] for i in range(0, len(files), chunk)]
    rows: list[dict] = []
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        for part in pool.map(functools.partial(_hash_files, draft_size=draft_size), chunks):
            rows.extend(part)
            if progress:
                progress(len(part))
    frame = pd.DataFrame(rows, columns=["path", "sha256", "bytes", "phash", "width", "height", "reason"])
    frame.insert(1, "url", [urls.get(p) for p in frame["path"]])
    return frame


def download_manifest_images(manifest_uri: str, folder: Path, crawl=None) -> dict[str, str]:
    """Download every distinct image_url of a manifest into `folder`; returns {file: url}.
    URLs that cannot be fetched are left out (the crawl stage is where they are accounted for)."""
    crawl = crawl or CrawlSettings()
    urls = sorted({u for u in read_manifest(manifest_uri, crawl=crawl).column("image_url").to_pylist() if u})
    folder.mkdir(parents=True, exist_ok=True)
    fetcher = Fetcher(crawl)

    def fetch(url: str) -> tuple[str, str] | None:
        result = fetcher.fetch(url)
        if result.outcome != "ok":
            return None
        target = folder / hashlib.sha1(url.encode()).hexdigest()
        target.write_bytes(result.data)
        return str(target), url

    try:
        with ThreadPoolExecutor(crawl.concurrency) as pool:
            return dict(item for item in pool.map(fetch, urls) if item)
    finally:
        fetcher.close()


def near_duplicate_pairs(hashes: pd.DataFrame, max_distance: int, confirm: bool = True,
                         threshold: float | None = None) -> pd.DataFrame:
    """All pairs of hashed files within `max_distance` bits; with `confirm`, the pixel-level
    score of each pair decides `confirmed` (files must still be readable at `path`)."""
    ok = hashes[hashes["phash"].notna()].reset_index(drop=True)
    values = np.array([int(h, 16) for h in ok["phash"]], dtype=np.uint64)
    found = find_near_duplicates(values, max_distance)
    pairs = pd.DataFrame({"path_a": ok["path"].to_numpy()[found.i], "path_b": ok["path"].to_numpy()[found.j],
                          "hamming_distance": found.distance.astype(np.int32),
                          "exact": ok["sha256"].to_numpy()[found.i] == ok["sha256"].to_numpy()[found.j]})
    if confirm and len(pairs):
        warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
        used = np.unique(np.concatenate([found.i, found.j]))
        slot = {int(p): n for n, p in enumerate(used)}
        images = [open_image(Path(ok.at[int(p), "path"]).read_bytes()) for p in used]
        scores = confirmation_scores(images, np.array([slot[int(i)] for i in found.i]),
                                     np.array([slot[int(j)] for j in found.j]))
        pairs["confirmation_score"] = scores
        pairs["confirmed"] = pairs["exact"] | (scores >= (threshold if threshold is not None else CONFIRMATION_THRESHOLD))
    return pairs
