"""Dedup stage: crawl run -> duplicate clusters and the canonical image of each.

Driver side (`run_dedup`):
  1. read the crawl run's live images (no bytes);
  2. hash what is not hashed yet: the pHash cache `dedup/hashes/` is keyed by sha256,
     so an image is hashed once, ever (Spark tasks, grouped by the file holding the bytes);
  3. exact duplicates: rows with the same sha256 are one node;
  4. near duplicates: exact pair search within `max_distance` bits, incremental: images
     already seen by the previous committed dedup run keep their confirmed pairs, only
     new images are searched (against everything and each other);
  5. every new candidate pair gets a second, independent pixel-level check (Spark tasks);
  6. clusters = connected components of confirmed pairs; canonical image per cluster by
     the documented rule (largest resolution, then earliest fetched, then smallest sha256).
Outputs: `dedup/<run_id>/images.parquet` (every live row -> cluster, canonical), `pairs.parquet`
(evidence), `quarantine/<run_id>/dedup/` (bytes that cannot be decoded), `_SUCCESS.json` last.

No product disappears: a row whose image is a duplicate points at its canonical image,
which the index maps back to every product that shares it.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa

from pipelines import layout
from pipelines.config import DedupSettings, S3Settings, Settings
from pipelines.dedup.confirmation import CONFIRMATION_CROPS, confirmation_scores
from pipelines.dedup.near_duplicates import (
    choose_canonical,
    connected_components,
    find_near_duplicates_between,
)
from pipelines.dedup.phash import open_image, phash_hex, try_phash_many
from pipelines.errors import StageRefused
from pipelines.readers import (  # noqa: F401
    committed_dedup_runs,
    previous_dedup_run,
    read_current_images,
    read_dedup_images,
)
from pipelines.spark import run_tasks
from pipelines.storage import Storage, open_storage
from schemas.reasons import BYTES_MISSING
from schemas.tables import DEDUP_IMAGES, DEDUP_PAIRS, QUARANTINE

HASH_CACHE = pa.schema([("sha256", pa.string()), ("phash", pa.string()), ("reason", pa.string()),
                        ("detail", pa.string()), ("run_id", pa.string())])


class DedupError(StageRefused):
    pass


@dataclass
class HashTask:
    warehouse: str
    s3: S3Settings
    run_id: str
    part: str
    stored_key: str
    sha256s: list[str]
    draft_size: int | None


@dataclass
class ConfirmTask:
    warehouse: str
    s3: S3Settings
    part: str
    locations: dict[str, str]          # sha256 -> stored_key
    pairs: list[tuple[str, str]]


@dataclass
class DedupSummary:
    run_id: str
    crawl_run_id: str
    previous_run_id: str | None
    max_distance: int
    confirm_threshold: float
    image_rows: int = 0
    unique_images: int = 0
    hashed_now: int = 0
    hashed_cached: int = 0
    quarantined: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    candidate_pairs_new: int = 0
    candidate_pairs_reused: int = 0
    confirmed_pairs: int = 0
    rejected_pairs: int = 0
    clusters: int = 0
    canonical_rows: int = 0
    exact_duplicate_rows: int = 0
    near_duplicate_rows: int = 0
    elapsed_s: float = 0.0

    @property
    def accounted(self) -> int:
        return self.canonical_rows + self.exact_duplicate_rows + self.near_duplicate_rows + self.quarantined

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "accounted": self.accounted}, indent=2, sort_keys=True)




# ---------------------------------------------------------------------------------------
# task side
# ---------------------------------------------------------------------------------------

def hash_task(task: HashTask) -> dict:
    """pHash the requested images of one stored part file; write a cache part."""
    storage = open_storage(task.warehouse, task.s3)
    wanted = set(task.sha256s)
    part = storage.read_parquet_file(task.stored_key, columns=["sha256", "image"]).to_pydict()
    blobs = {}
    for sha, data in zip(part["sha256"], part["image"]):
        if sha in wanted:
            blobs.setdefault(sha, data)
    shas = sorted(blobs)
    hashes, reasons = try_phash_many([blobs[s] for s in shas], draft_size=task.draft_size)
    missing = sorted(wanted - set(blobs))
    rows = [{"sha256": s, "phash": None if r else phash_hex(h), "reason": r,
             "detail": f"pHash failed: {r}" if r else None, "run_id": task.run_id}
            for s, h, r in zip(shas, hashes.tolist(), reasons)]
    rows += [{"sha256": s, "phash": None, "reason": BYTES_MISSING, "run_id": task.run_id,
              "detail": f"not found in {task.stored_key}"} for s in missing]
    storage.write_table(f"{hash_cache_prefix(task.draft_size)}part-{task.run_id}-{task.part}.parquet",
                        pa.Table.from_pylist(rows, HASH_CACHE))
    return {"hashed": len(rows)}


def confirm_task(task: ConfirmTask) -> list[float]:
    """Pixel-level confirmation scores of candidate pairs (the images are decoded once each)."""
    storage = open_storage(task.warehouse, task.s3)
    needed = sorted({s for pair in task.pairs for s in pair})
    by_key: dict[str, list[str]] = {}
    for sha in needed:
        by_key.setdefault(task.locations[sha], []).append(sha)
    images = {}
    for key, shas in by_key.items():
        wanted = set(shas)
        part = storage.read_parquet_file(key, columns=["sha256", "image"]).to_pydict()
        for sha, data in zip(part["sha256"], part["image"]):
            if sha in wanted and sha not in images:
                images[sha] = open_image(data)
    position = {sha: i for i, sha in enumerate(needed)}
    loaded = [images[sha] for sha in needed]
    first = np.array([position[a] for a, _ in task.pairs])
    second = np.array([position[b] for _, b in task.pairs])
    return confirmation_scores(loaded, first, second).tolist()


# ---------------------------------------------------------------------------------------
# driver side
# ---------------------------------------------------------------------------------------

# Bumped whenever the same bytes would hash differently (2: transparency composited on white).
HASH_VERSION = 2



def hash_cache_prefix(draft_size: int | None) -> str:
    return layout.hash_cache_prefix(HASH_VERSION, draft_size)


def read_hash_cache(storage: Storage, draft_size: int | None) -> pd.DataFrame:
    cache = storage.read_table(hash_cache_prefix(draft_size), schema=HASH_CACHE).to_pandas()
    # A later successful hash of the same bytes wins over an earlier failure.
    cache = cache.sort_values(["sha256", "phash"], na_position="first").drop_duplicates("sha256", keep="last")
    return cache.set_index("sha256")


def with_valid_canonicals(rows: pd.DataFrame, rejected: set[str]) -> pd.DataFrame:
    """Dedup rows (DEDUP_IMAGES) whose canonical image is not `rejected` by validation: a
    cluster whose canonical image was rejected gets a new one, its best valid member by the
    same rule (largest resolution, earliest fetched, smallest sha256), and all its rows point
    there; a cluster with no valid member is left out (its rows are quarantined).

    Dedup runs before validation, so a cluster's canonical image can fail a check (format,
    byte size...) that a copy of it passes; without this, every product of the cluster would
    lose its picture. `cluster_id` keeps naming the cluster as dedup found it.
    """
    orphaned = rows["canonical_sha256"].isin(rejected)
    if not orphaned.any():
        return rows.reset_index(drop=True)
    members = (rows[orphaned & ~rows["sha256"].isin(rejected)].sort_values(["cluster_id", "sha256", "fetched_at"])
               .drop_duplicates("sha256").reset_index(drop=True))
    labels = pd.factorize(members["cluster_id"])[0]
    best = choose_canonical(labels, members["width"].fillna(0), members["height"].fillna(0),
                            members["fetched_at"].astype("int64"), members["sha256"])
    new_canonical = dict(zip(members["cluster_id"], members["sha256"].to_numpy()[best]))
    out = rows.copy()
    out.loc[orphaned, "canonical_sha256"] = out.loc[orphaned, "cluster_id"].map(new_canonical)
    out = out[out["canonical_sha256"].notna()]
    out["is_canonical"] = out["sha256"] == out["canonical_sha256"]
    return out.reset_index(drop=True)


def _hash_missing(storage, settings: Settings, run_id, images, runner, spark) -> tuple[pd.DataFrame, int]:
    cache = read_hash_cache(storage, settings.dedup.jpeg_draft_size)
    # bytes_missing says where the bytes were looked for, not what the image is: never a cached verdict,
    # tried again every run (the crawl re-fetches images whose stored bytes are gone).
    known = cache.index[cache["reason"].ne(BYTES_MISSING).to_numpy()]
    todo = images[~images["sha256"].isin(known)].drop_duplicates("sha256")
    tasks = []
    per_task = settings.dedup.images_per_task
    for key, group in todo.groupby("stored_key", sort=True):
        shas = sorted(group["sha256"])
        for start in range(0, len(shas), per_task):
            # The part is named by the images it hashes, not by its position alone: a rerun of a killed
            # run has fewer images to hash, and its task 0 must not overwrite the killed run's task 0.
            batch = shas[start:start + per_task]
            digest = hashlib.sha256("\n".join(batch).encode()).hexdigest()[:16]
            tasks.append(HashTask(settings.warehouse, settings.s3, run_id, f"{len(tasks):05d}-{digest}", key,
                                  batch, settings.dedup.jpeg_draft_size))
    if tasks:

        run_tasks(hash_task, tasks, runner=runner, spark=spark,
                  description="dedup: pHash", job_group=f"dedup-hash-{run_id}")
        cache = read_hash_cache(storage, settings.dedup.jpeg_draft_size)
    return cache, len(todo)


def _confirm(storage, settings: Settings, pairs: list[tuple[str, str]], locations: dict[str, str], runner,
             spark) -> list[float]:
    if not pairs:
        return []
    per_task = settings.dedup.pairs_per_task
    tasks = [ConfirmTask(settings.warehouse, settings.s3, f"{i:05d}",
                         {s: locations[s] for pair in pairs[start:start + per_task] for s in pair},
                         pairs[start:start + per_task])
             for i, start in enumerate(range(0, len(pairs), per_task))]

    results = run_tasks(confirm_task, tasks, runner=runner, spark=spark,
                        description="dedup: confirm pairs")
    return [score for part in results for score in part]


def run_dedup(settings: Settings, run_id: str, *, runner: str = "spark", spark=None) -> DedupSummary:
    started = time.monotonic()
    cfg: DedupSettings = settings.dedup
    storage = open_storage(settings.warehouse, settings.s3)
    images = read_current_images(storage, run_id)
    previous = previous_dedup_run(storage, run_id)
    summary = DedupSummary(run_id=run_id, crawl_run_id=run_id, previous_run_id=previous,
                           max_distance=cfg.max_distance, confirm_threshold=cfg.confirm_threshold,
                           image_rows=len(images))
    storage.delete_prefix(layout.dedup_prefix(run_id))  # a rerun replaces this run's outputs only
    storage.delete_prefix(layout.quarantine_prefix(run_id, "dedup"))

    cache, summary.hashed_now = _hash_missing(storage, settings, run_id, images, runner, spark)
    images = images.join(cache[["phash", "reason", "detail"]], on="sha256")
    failed = images[images["phash"].isna()]
    good = images[images["phash"].notna()].reset_index(drop=True)
    summary.hashed_cached = int(images["sha256"].nunique()) - summary.hashed_now
    summary.quarantined = len(failed)
    summary.quarantine_reasons = dict(Counter(failed["reason"].fillna("hash_failed")))

    # One node per distinct image; its attributes for the canonical rule.
    nodes = (good.sort_values(["sha256", "fetched_at"]).drop_duplicates("sha256")
             .reset_index(drop=True)[["sha256", "phash", "width", "height", "fetched_at", "stored_key"]])
    summary.unique_images = len(nodes)
    position = {sha: i for i, sha in enumerate(nodes["sha256"])}
    hashes = np.array([int(h, 16) for h in nodes["phash"]], dtype=np.uint64)

    # Incremental pair search: reuse the previous run's verdicts among images seen then.
    seen_before: set[str] = set()
    reused = pd.DataFrame(columns=DEDUP_PAIRS.names)
    if previous:
        prev_images = storage.read_table(layout.dedup_images_key(previous), columns=["sha256"]).to_pandas()
        prev_pairs = storage.read_table(layout.dedup_pairs_key(previous), schema=DEDUP_PAIRS).to_pandas()
        same_rules = _rules(storage, previous) == _rules_now(cfg)
        if same_rules:
            seen_before = set(prev_images["sha256"]) & set(position)
            live = prev_pairs["sha256_a"].isin(seen_before) & prev_pairs["sha256_b"].isin(seen_before)
            reused = prev_pairs[live]
    old_idx = np.array(sorted(position[s] for s in seen_before), dtype=np.int64)
    new_idx = np.array(sorted(set(range(len(nodes))) - set(old_idx.tolist())), dtype=np.int64)
    found = find_near_duplicates_between(hashes[new_idx], hashes[old_idx], cfg.max_distance)
    order = np.concatenate([old_idx, new_idx])
    cand_a, cand_b = order[found.i], order[found.j]
    candidates = []
    for a, b, d in zip(cand_a.tolist(), cand_b.tolist(), found.distance.tolist()):
        sa, sb = sorted((nodes.at[a, "sha256"], nodes.at[b, "sha256"]))
        candidates.append((sa, sb, int(d)))
    summary.candidate_pairs_new = len(candidates)
    summary.candidate_pairs_reused = len(reused)
    locations = dict(zip(nodes["sha256"], nodes["stored_key"]))
    scores = _confirm(storage, settings, [(a, b) for a, b, _ in candidates], locations, runner, spark)
    new_pairs = pd.DataFrame({
        "sha256_a": [c[0] for c in candidates], "sha256_b": [c[1] for c in candidates],
        "hamming_distance": [c[2] for c in candidates], "confirmation_score": scores,
        "confirmed": [s >= cfg.confirm_threshold for s in scores]})
    frames = [frame for frame in (reused, new_pairs) if len(frame)]
    pairs = pd.concat(frames, ignore_index=True) if frames else new_pairs
    pairs = pairs.astype({"hamming_distance": "int32", "confirmation_score": "float32", "confirmed": bool})
    pairs = pairs.sort_values(["sha256_a", "sha256_b"]).reset_index(drop=True)
    confirmed = pairs[pairs["confirmed"].astype(bool)]
    summary.confirmed_pairs = len(confirmed)
    summary.rejected_pairs = len(pairs) - len(confirmed)

    labels = connected_components(len(nodes), confirmed["sha256_a"].map(position).to_numpy(),
                                  confirmed["sha256_b"].map(position).to_numpy())
    canonical = choose_canonical(labels, nodes["width"].fillna(0), nodes["height"].fillna(0),
                                 nodes["fetched_at"].astype("int64"), nodes["sha256"])
    nodes["canonical_sha256"] = nodes["sha256"].to_numpy()[canonical]
    summary.clusters = int(len(np.unique(labels)))

    rows = good.merge(nodes[["sha256", "canonical_sha256"]], on="sha256", how="left")
    rows["is_canonical"] = rows["sha256"] == rows["canonical_sha256"]
    # The cluster's first row is a row of the canonical image itself: that row is "none".
    rows = rows.sort_values(["canonical_sha256", "is_canonical", "product_id", "image_url"],
                            ascending=[True, False, True, True]).reset_index(drop=True)
    rows["cluster_id"] = rows["canonical_sha256"]
    first_of_cluster = ~rows.duplicated("canonical_sha256")
    rows["duplicate_kind"] = np.where(first_of_cluster, "none", np.where(rows["is_canonical"], "exact", "near"))
    # An exact copy of a non-canonical image is still a near duplicate of the canonical one.
    rows["run_id"] = run_id
    summary.canonical_rows = int((rows["duplicate_kind"] == "none").sum())
    summary.exact_duplicate_rows = int((rows["duplicate_kind"] == "exact").sum())
    summary.near_duplicate_rows = int((rows["duplicate_kind"] == "near").sum())

    storage.write_table(layout.dedup_images_key(run_id),
                        pa.Table.from_pandas(rows, schema=DEDUP_IMAGES, preserve_index=False))
    storage.write_table(layout.dedup_pairs_key(run_id),
                        pa.Table.from_pandas(pairs, schema=DEDUP_PAIRS, preserve_index=False))
    now = pd.Timestamp(datetime.now(timezone.utc))
    quarantine = [{"run_id": run_id, "stage": "dedup", "reason": r.reason or "hash_failed", "detail": r.detail,
                   "product_id": r.product_id, "category": r.category, "image_url": r.image_url,
                   "sha256": r.sha256, "at": now} for r in failed.itertuples()]
    storage.write_table(f"{layout.quarantine_prefix(run_id, 'dedup')}part-00000.parquet",
                        pa.Table.from_pylist(quarantine, QUARANTINE))
    summary.elapsed_s = round(time.monotonic() - started, 3)
    if summary.accounted != summary.image_rows:
        raise DedupError(f"accounting mismatch in dedup {run_id}: {summary.accounted} of {summary.image_rows} rows")
    storage.write_text(layout.dedup_rules_key(run_id), json.dumps(_rules_now(cfg), sort_keys=True))
    storage.write_text(layout.dedup_success_key(run_id), summary.to_json())
    return summary


def _rules_now(cfg: DedupSettings) -> dict:
    """What a pair's verdict depends on: reuse old verdicts only when these are unchanged."""
    return {"max_distance": cfg.max_distance, "confirm_threshold": cfg.confirm_threshold,
            "crops": list(CONFIRMATION_CROPS), "draft": cfg.jpeg_draft_size, "hash_version": HASH_VERSION}


def _rules(storage: Storage, run_id: str) -> dict | None:
    key = layout.dedup_rules_key(run_id)
    return json.loads(storage.read_text(key)) if storage.exists(key) else None
