"""Serving side: pull the newest good snapshot to local disk, open it once, search it.

    pull("s3://search/warehouse", "/srv/catalog-index")      # resolve LATEST, download, verify, swap
    client = SnapshotClient("/srv/catalog-index", mmap=True)  # opens <dest>/current, maps every shard
    client.search_images(["shoe.jpg"], k=10, category="shoes")
    client.search_vectors(vectors, k=10)
    client.refresh()                                          # after the next pull: move to the new current

A pulled destination looks like:

    <dest>/snapshots/<snapshot_id>/   manifest.json, shards/, idmaps/, model/ (verified copies)
    <dest>/current -> snapshots/<id>  a symlink, replaced atomically (rename) after verification

A process that has a snapshot open keeps searching it while a pull swaps `current`; `refresh()`
opens the new one beside it and swaps (searches already running finish on the old one). An
`OpenSnapshot` is immutable once open: the search service (`pipelines.serve`) holds two of them
during a swap. Shards can be memory-mapped (`mmap=True`); id maps are Arrow columns, never one
Python object per row. Search merges each relevant shard's top hits, maps vectors to products
through the id maps and returns each product once, best score first.

This module must never start Spark, never serve a file whose checksum it has not verified on
pull, and never modify the warehouse.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipelines.config import S3Settings
from pipelines.errors import UsageError
from pipelines.layout import snapshot_prefix
from pipelines.snapshot import (MANIFEST_FILE, MODEL_PCA_PATH, SnapshotVerificationError, apply_search_params,
                                read_latest, sha256_of_file, validate_manifest)
from pipelines.storage import StorageError, open_storage, read_uri_bytes

VERIFIED_MARKER = ".verified"


class SnapshotError(UsageError):
    """A snapshot cannot be pulled or opened; the message says what to do."""


# ------------------------------------------------------------------------------------------
# pull
# ------------------------------------------------------------------------------------------

@dataclass
class PullResult:
    snapshot_id: str
    path: Path          # the verified local snapshot directory
    changed: bool       # False: `current` already was this snapshot
    previous: str | None


def current_snapshot_id(dest: str | os.PathLike) -> str | None:
    link = Path(dest) / "current"
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


@contextmanager
def _pull_lock(dest: Path) -> Iterator[None]:
    """One pull at a time per destination (two cron jobs, or a pull from each of two containers)."""
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / ".pull.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _locally_verified(directory: Path, manifest_sha256: str | None) -> bool:
    marker = directory / VERIFIED_MARKER
    if not marker.is_file() or not (directory / MANIFEST_FILE).is_file():
        return False
    if manifest_sha256 is None:
        return True
    return sha256_of_file(directory / MANIFEST_FILE)[0] == manifest_sha256


def pull(warehouse: str, dest: str | os.PathLike, *, s3: S3Settings | None = None, index_name: str = "catalog",
         keep_local: int = 2) -> PullResult:
    """Make `<dest>/current` the snapshot LATEST names, verified file by file; no-op when it already is.

    Raises SnapshotVerificationError (and leaves `current` untouched) when any file's size or
    sha256 differs from the manifest, or the manifest from the sha256 recorded in LATEST.
    """
    dest = Path(dest).expanduser().resolve()
    storage = open_storage(warehouse, s3)
    pointer = read_latest(storage, index_name)
    if pointer is None:
        raise SnapshotError(f"index {index_name!r} has no published snapshot in {warehouse} (no LATEST): "
                            "run build-index and publish first")
    snapshot_id = pointer["snapshot_id"]
    expected_manifest_sha = pointer.get("manifest_sha256")
    snapshots = dest / "snapshots"
    with _pull_lock(dest):
        previous = current_snapshot_id(dest)
        final = snapshots / snapshot_id
        if previous == snapshot_id and _locally_verified(final, expected_manifest_sha):
            return PullResult(snapshot_id, final, False, previous)
        if not _locally_verified(final, expected_manifest_sha):
            _download_verified(storage, index_name, snapshot_id, expected_manifest_sha, snapshots)
        _point_current(dest, snapshot_id)
        _remove_old_local(snapshots, keep={snapshot_id, previous}, keep_local=keep_local)
        return PullResult(snapshot_id, final, True, previous)


def _download_verified(storage, index_name: str, snapshot_id: str, expected_manifest_sha: str | None,
                       snapshots: Path) -> None:
    prefix = snapshot_prefix(index_name, snapshot_id)
    try:
        manifest_data = storage.read_bytes(prefix + MANIFEST_FILE)
    except StorageError as exc:
        raise SnapshotError(f"LATEST names {snapshot_id} but its manifest cannot be read ({exc}); "
                            "it may have been retired meanwhile: pull again") from exc
    if expected_manifest_sha and hashlib.sha256(manifest_data).hexdigest() != expected_manifest_sha:
        raise SnapshotVerificationError(f"manifest of {snapshot_id} does not match the sha256 in LATEST; "
                                        "refusing the snapshot", [MANIFEST_FILE])
    manifest = validate_manifest(json.loads(manifest_data), f"{storage.uri_for(prefix + MANIFEST_FILE)}")
    snapshots.mkdir(parents=True, exist_ok=True)
    staging = snapshots / f".partial-{snapshot_id}-{secrets.token_hex(4)}"
    try:
        bad = []
        for record in manifest["files"]:
            local = staging / record["path"]
            try:
                storage.download_file(prefix + record["path"], local)
            except StorageError as exc:
                raise SnapshotError(f"cannot download {record['path']} of snapshot {snapshot_id} ({exc}); "
                                    "if it was retired meanwhile, pull again") from exc
            digest, size = sha256_of_file(local)
            if digest != record["sha256"] or size != record["bytes"]:
                bad.append(f"{record['path']} (sha256 {digest[:12]}…, {size} bytes; manifest says "
                           f"{record['sha256'][:12]}…, {record['bytes']} bytes)")
        if bad:
            raise SnapshotVerificationError(
                f"snapshot {snapshot_id} failed verification, kept the current local copy: " + "; ".join(bad)
                + ". The warehouse copy is damaged: roll back (`catalog-index rollback --to ID`) or republish",
                bad)
        (staging / MANIFEST_FILE).write_bytes(manifest_data)
        (staging / VERIFIED_MARKER).write_text(hashlib.sha256(manifest_data).hexdigest() + "\n")
        final = snapshots / snapshot_id
        if final.exists():  # an unverified leftover of an interrupted copy
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _point_current(dest: Path, snapshot_id: str) -> None:
    """Swap `current` with one rename: readers see the old target or the new one, never neither."""
    temporary = dest / f".current-{secrets.token_hex(4)}"
    os.symlink(f"snapshots/{snapshot_id}", temporary)
    os.replace(temporary, dest / "current")


def _remove_old_local(snapshots: Path, keep: set, keep_local: int) -> None:
    local = sorted(p.name for p in snapshots.iterdir() if p.is_dir() and not p.name.startswith("."))
    keep = {k for k in keep if k} | set(local[-keep_local:])
    for name in local:
        if name not in keep:
            shutil.rmtree(snapshots / name, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# search
# ------------------------------------------------------------------------------------------

@dataclass
class Hit:
    product_id: str
    category: str
    score: float
    image_url: str
    title: str | None = None
    sha256: str | None = None
    shard_id: str | None = None
    row: int | None = field(default=None, repr=False)  # id-map row in its shard

    def to_json(self) -> dict:
        return {"product_id": self.product_id, "category": self.category, "score": round(float(self.score), 6),
                "image_url": self.image_url}


@dataclass
class QueryResult:
    query: str
    results: list[Hit] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict:
        out = {"query": self.query, "results": [hit.to_json() for hit in self.results]}
        if self.error:
            out["error"] = self.error
        return out


IDMAP_COLUMNS = ("product_id", "category", "image_url", "title", "sha256")


class _Shard:
    """One loaded shard: its FAISS index (memory-mapped with `mmap`) and its id map as Arrow
    columns sorted by vector id (no Python object per row: a million-row map opens in a blink)."""

    def __init__(self, root: Path, entry: dict, dimension: int, mmap: bool = False):
        # faiss and pyarrow: kept out of import time (the CLI imports this module for --help)
        import faiss
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self.entry = entry
        self.shard_id = entry["shard_id"]
        self.categories = set(entry["categories"])
        index_path = _inside(root, entry["files"]["index"]["path"])
        # IO_FLAG_MMAP_IFC maps flat codes and inverted lists of every index type we build: the
        # file's pages are shared with the page cache, so opening costs no copy and two snapshots
        # side by side during a swap cost no second copy of RAM.
        flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        try:
            self.index = faiss.read_index(str(index_path), flags)
        except RuntimeError as exc:
            raise SnapshotError(f"shard {self.shard_id}: {index_path.name} is not a readable FAISS index "
                                f"({_short(str(exc))}); pull the snapshot again") from exc
        if self.index.ntotal != entry["vectors"] or self.index.d != dimension:
            raise SnapshotError(f"shard {self.shard_id}: the index holds {self.index.ntotal} vectors of dimension "
                                f"{self.index.d}, the manifest says {entry['vectors']} of {dimension}")
        self.mmapped = bool(mmap)
        self.params = dict(entry.get("search_params") or {})
        apply_search_params(self.index, self.params)
        self.kind = entry["index_type"]
        table = pq.read_table(_inside(root, entry["files"]["idmap"]["path"]), columns=["vector_id", *IDMAP_COLUMNS],
                              memory_map=mmap)
        if table.num_rows != entry["idmap_rows"]:
            raise SnapshotError(f"shard {self.shard_id}: the id map has {table.num_rows} rows, the manifest says "
                                f"{entry['idmap_rows']}")
        vector_ids = table.column("vector_id").to_numpy()
        if len(vector_ids) and (np.diff(vector_ids) < 0).any():  # the build writes them sorted; never assume
            order = np.argsort(vector_ids, kind="stable")
            table, vector_ids = table.take(order), vector_ids[order]
        if len(vector_ids) and (vector_ids[0] < 0 or vector_ids[-1] >= self.index.ntotal):
            raise SnapshotError(f"shard {self.shard_id}: the id map names vector ids outside 0..{self.index.ntotal - 1}")
        self.vector_ids = vector_ids.astype(np.int64, copy=False)
        self.columns = {name: table.column(name).combine_chunks() for name in IDMAP_COLUMNS}
        encoded = pc.dictionary_encode(self.columns["category"])
        self.category_names = encoded.dictionary.to_pylist()
        self.category_codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        # rows of vector v are offsets[v]:offsets[v+1]
        self.offsets = np.searchsorted(self.vector_ids, np.arange(self.index.ntotal + 1))
        self._category_ids: dict[str, np.ndarray] = {}
        self._direct_map_ready = False

    def category_code(self, category: str) -> int:
        try:
            return self.category_names.index(category)
        except ValueError:
            return -1

    def ids_in_category(self, category: str) -> np.ndarray:
        if category not in self._category_ids:
            rows = self.category_codes == self.category_code(category)
            self._category_ids[category] = np.unique(self.vector_ids[rows]).astype(np.int64)
        return self._category_ids[category]

    def search(self, queries: np.ndarray, k: int, category: str | None) -> tuple[np.ndarray, np.ndarray]:
        # faiss: kept out of import time
        import faiss

        k = min(k, self.index.ntotal)
        if category is None or self.categories == {category}:
            return self.index.search(queries, k)
        allowed = self.ids_in_category(category)
        if len(allowed) == 0:
            return np.full((len(queries), 0), -np.inf, dtype=np.float32), np.full((len(queries), 0), -1)
        selector = faiss.IDSelectorBatch(allowed)
        # A filter keeps a fraction of each probed list: probe proportionally more so that about as
        # many of the category's vectors are scanned as an unfiltered search scans vectors.
        widen = max(1.0, self.index.ntotal / len(allowed))
        if self.kind.startswith("ivf"):
            params = faiss.SearchParametersIVF()
            nlist = faiss.extract_index_ivf(self.index).nlist
            params.nprobe = int(min(nlist, math.ceil(self.params.get("nprobe", 1) * widen)))
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = int(min(4096, math.ceil(self.params.get("efSearch", 64) * widen)))
        else:
            params = faiss.SearchParameters()
        params.sel = selector
        return self.index.search(queries, min(k, len(allowed)), params=params)

    def rows_of(self, vector_id: int) -> range:
        return range(self.offsets[vector_id], self.offsets[vector_id + 1])

    def rows_of_hits(self, ids: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(id-map rows, their scores) of one query's hits: a vector shared by several products
        gives one row per product."""
        valid = ids >= 0
        ids, scores = ids[valid], scores[valid]
        starts, counts = self.offsets[ids], self.offsets[ids + 1] - self.offsets[ids]
        total = int(counts.sum())
        if total == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        firsts = np.repeat(np.cumsum(counts) - counts, counts)
        rows = np.repeat(starts, counts) + (np.arange(total) - firsts)
        return rows, np.repeat(scores, counts)

    def values(self, name: str, rows: np.ndarray) -> list:
        return self.columns[name].take(rows).to_pylist()

    def vector_of_row(self, row: int) -> np.ndarray:
        """The stored vector of an id-map row (exact for Flat/HNSW/IVF-Flat, decoded for SQ/PQ)."""
        # faiss: kept out of import time
        import faiss

        vector_id = int(self.vector_ids[row])
        if self.kind.startswith("ivf") and not self._direct_map_ready:
            ivf = faiss.extract_index_ivf(self.index)
            if ivf.direct_map.type == faiss.DirectMap.NoMap:
                ivf.make_direct_map()  # ntotal int64s, built once per shard on first use
            self._direct_map_ready = True
        return self.index.reconstruct(vector_id).astype(np.float32)


def _inside(root: Path, relative: str) -> Path:
    """A manifest path resolved under the snapshot directory, never outside it (the schema allows
    only shards/, idmaps/ and model/ names, but a reader trusts no path it did not check)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise SnapshotError(f"manifest path {relative!r} leaves the snapshot directory {root}")
    return path


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


class OpenSnapshot:
    """One snapshot directory opened for search: manifest, shards and id maps. Immutable once open,
    so a search holding a reference finishes on it while a newer one is swapped in beside it.

    `verify`: True re-hashes every file; False checks sizes only; None hashes unless the
    directory carries `pull`'s `.verified` marker for exactly this manifest (sizes are always checked).
    """

    def __init__(self, root: str | os.PathLike, *, verify: bool | None = False, mmap: bool = False):
        root = Path(root)
        self.root = root
        manifest_path = root / MANIFEST_FILE
        try:
            manifest_data = manifest_path.read_bytes()
            manifest = json.loads(manifest_data)
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{manifest_path} cannot be read as JSON ({exc}); pull the snapshot again") from exc
        self.manifest = validate_manifest(manifest, str(manifest_path))
        self.manifest_sha256 = hashlib.sha256(manifest_data).hexdigest()
        if verify is None:
            verify = not _locally_verified(root, self.manifest_sha256)
        self.verified = bool(verify) or _locally_verified(root, self.manifest_sha256)
        self._check_files(verify)
        self.dimension = int(self.manifest["dimension"])
        self.mmap = mmap
        self.shards = [_Shard(root, entry, self.dimension, mmap) for entry in self.manifest["shards"]]

    @property
    def snapshot_id(self) -> str:
        return self.manifest["snapshot_id"]

    @property
    def model_version(self) -> str:
        return self.manifest["model"]["version"]

    @property
    def categories(self) -> list[str]:
        return sorted({c for shard in self.shards for c in shard.categories})

    def _check_files(self, verify: bool) -> None:
        bad = []
        for record in self.manifest["files"]:
            local = _inside(self.root, record["path"])
            if not local.is_file():
                bad.append(f"{record['path']} (missing)")
            elif local.stat().st_size != record["bytes"]:
                bad.append(f"{record['path']} ({local.stat().st_size} bytes, manifest says {record['bytes']})")
            elif verify and sha256_of_file(local)[0] != record["sha256"]:
                bad.append(f"{record['path']} (sha256 differs from the manifest)")
        if bad:
            raise SnapshotVerificationError(f"snapshot {self.root} is damaged: {'; '.join(bad)}; pull it again", bad)

    # -- vectors ---------------------------------------------------------------------------

    def normalized_queries(self, queries) -> np.ndarray:
        """Queries as a C-contiguous float32 matrix of unit rows; SnapshotError for a wrong dimension."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.dimension:
            raise SnapshotError(f"query vectors have dimension {queries.shape[-1]}, snapshot {self.snapshot_id} "
                                f"holds {self.dimension}: embed with model {self.model_version}")
        if not np.isfinite(queries).all():
            raise SnapshotError("query vectors hold NaN or infinite values")
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        return np.ascontiguousarray(queries / np.maximum(norms, 1e-12))  # scores are cosine similarities

    def search_vectors(self, queries: np.ndarray, k: int = 10, category: str | None = None, *,
                       timings: dict[str, float] | None = None) -> list[list[Hit]]:
        """Top-k products per query vector, each product once (its best-scoring image), best first.

        `timings`, when given, gets the seconds spent in FAISS (`search`) and in mapping and
        merging hits (`merge`) added to it."""
        queries = self.normalized_queries(queries)
        shards = [s for s in self.shards if category is None or category in s.categories]
        results: list[list[Hit]] = [[] for _ in range(len(queries))]
        if not shards or k <= 0:
            return results
        searching = merging = 0.0
        pending = np.arange(len(queries))
        fetch = 2 * k
        while len(pending):
            best: list[dict[str, Hit]] = [{} for _ in pending]
            exhausted = True
            for shard in shards:
                started = time.perf_counter()
                scores, ids = shard.search(queries[pending], fetch, category)
                searched = time.perf_counter()
                searching += searched - started
                if ids.shape[1] >= fetch and fetch < shard.index.ntotal:
                    exhausted = False
                code = shard.category_code(category) if category is not None else None
                for row in range(len(pending)):
                    rows, row_scores = shard.rows_of_hits(ids[row], scores[row])
                    if code is not None:
                        keep = shard.category_codes[rows] == code
                        rows, row_scores = rows[keep], row_scores[keep]
                    if not len(rows):
                        continue
                    products = shard.values("product_id", rows)
                    candidates = best[row]
                    for position, (product, score) in enumerate(zip(products, row_scores.tolist())):
                        if product not in candidates or candidates[product].score < score:
                            candidates[product] = Hit(product, "", score, "", shard_id=shard.shard_id,
                                                      row=int(rows[position]))
                merging += time.perf_counter() - searched
            started = time.perf_counter()
            still_short = []
            for row, query_index in enumerate(pending):
                ranked = sorted(best[row].values(), key=lambda hit: (-hit.score, hit.product_id))
                results[query_index] = ranked[:k]
                if len(ranked) < k and not exhausted:
                    still_short.append(query_index)  # one product had several images: fetch deeper
            pending = np.array(still_short, dtype=np.int64)
            fetch *= 4
            merging += time.perf_counter() - started
        started = time.perf_counter()
        self._fill_hits([hit for hits in results for hit in hits])
        merging += time.perf_counter() - started
        if timings is not None:
            timings["search"] = timings.get("search", 0.0) + searching
            timings["merge"] = timings.get("merge", 0.0) + merging
        return results

    def _fill_hits(self, hits: list[Hit]) -> None:
        """Read the id-map columns of the hits that made a top-k (one take per column and shard)."""
        by_shard: dict[str, list[Hit]] = {}
        for hit in hits:
            by_shard.setdefault(hit.shard_id, []).append(hit)
        shards = {shard.shard_id: shard for shard in self.shards}
        for shard_id, shard_hits in by_shard.items():
            shard = shards[shard_id]
            rows = np.array([hit.row for hit in shard_hits], dtype=np.int64)
            columns = {name: shard.values(name, rows) for name in ("category", "image_url", "title", "sha256")}
            for position, hit in enumerate(shard_hits):
                hit.category = columns["category"][position]
                hit.image_url = columns["image_url"][position]
                hit.title = columns["title"][position]
                hit.sha256 = columns["sha256"][position]

    def locate_product(self, product_id: str) -> tuple[_Shard, int] | None:
        """(shard, id-map row) of a product's first image, or None when the snapshot lacks it."""
        # pyarrow: kept out of import time
        import pyarrow.compute as pc

        for shard in self.shards:
            row = pc.index(shard.columns["product_id"], product_id).as_py()
            if row is not None and row >= 0:
                return shard, row
        return None

    def similar_products(self, product_id: str, k: int = 10, *,
                         timings: dict[str, float] | None = None) -> list[Hit] | None:
        """Products most like `product_id` (itself left out), from its stored vector; None if unknown."""
        found = self.locate_product(product_id)
        if found is None:
            return None
        shard, row = found
        vector = shard.vector_of_row(row)
        hits = self.search_vectors(vector, k + 1, timings=timings)[0]
        return [hit for hit in hits if hit.product_id != product_id][:k]


class SnapshotClient:
    """A snapshot opened once for many searches: a pull destination (follows `current` on
    `refresh()`) or a snapshot directory.

    `verify=True` re-hashes every file on open (a pull already did; use it for hand-copied dirs).
    `mmap=True` memory-maps the shard files instead of reading them into RAM: opening is nearly
    free and several processes (or two snapshots during a swap) share the page cache.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool | None = False, device: str = "cpu",
                 mmap: bool = False):
        path = Path(path).expanduser()
        if (path / MANIFEST_FILE).is_file():
            self.destination = None
            root = path
        elif (path / "current").exists():
            self.destination = path
            root = (path / "current").resolve()  # pinned: a later pull moves it only through refresh()
        else:
            raise SnapshotError(f"{path} holds no manifest.json and no 'current' snapshot: pass a pulled "
                                "destination or a snapshot directory (catalog-index pull --warehouse W --dest DIR)")
        self.device = device
        self.verify = verify
        self.mmap = mmap
        self.snapshot = OpenSnapshot(root, verify=verify, mmap=mmap)

    def refresh(self) -> bool:
        """Open the snapshot `current` now names, if it changed; True when this client moved to it.
        Searches already running finish on the snapshot they started with. A snapshot that fails
        to open raises, and the client keeps the one it had."""
        if self.destination is None:
            return False
        root = (self.destination / "current").resolve()
        if root == self.snapshot.root:
            return False
        self.snapshot = OpenSnapshot(root, verify=self.verify, mmap=self.mmap)
        return True

    @property
    def root(self) -> Path:
        return self.snapshot.root

    @property
    def manifest(self) -> dict:
        return self.snapshot.manifest

    @property
    def shards(self) -> list[_Shard]:
        return self.snapshot.shards

    @property
    def dimension(self) -> int:
        return self.snapshot.dimension

    @property
    def snapshot_id(self) -> str:
        return self.snapshot.snapshot_id

    @property
    def categories(self) -> list[str]:
        return self.snapshot.categories

    def search_vectors(self, queries: np.ndarray, k: int = 10, category: str | None = None) -> list[list[Hit]]:
        """Top-k products per query vector, each product once (its best-scoring image), best first."""
        return self.snapshot.search_vectors(queries, k, category)

    # -- images ----------------------------------------------------------------------------

    def search_images(self, paths_or_urls: Sequence[str], k: int = 10, category: str | None = None) -> list[QueryResult]:
        """Embed each image with the snapshot's model version, then `search_vectors`. A query image
        that cannot be read or decoded gets an `error` and no results; the others go on."""
        snapshot = self.snapshot  # one snapshot for the whole call, whatever refresh() does meanwhile
        vectors, errors = embed_query_images(list(paths_or_urls), snapshot.manifest["model"], snapshot.root,
                                             self.device)
        ok = [i for i in range(len(paths_or_urls)) if i not in errors]
        hits = snapshot.search_vectors(vectors, k, category) if ok else []
        out = [QueryResult(str(query), error=errors.get(i)) for i, query in enumerate(paths_or_urls)]
        for i, result in zip(ok, hits):
            out[i].results = result
        return out


def model_spec_from_manifest(model_info: dict, snapshot_dir: Path):
    """Rebuild the ModelSpec a snapshot was built with; refuse if this installation gives other vectors."""
    # torch: kept out of import time (the model loads only to embed query images)
    from pipelines.embed import ModelSpec, PcaProjection, Preprocessing, model_version

    if not model_info.get("weights_sha256") or not model_info.get("preprocessing"):
        raise SnapshotError(f"snapshot vectors come from model version {model_info['version']}, which this "
                            "installation cannot reproduce: search it with SnapshotClient.search_vectors")
    described = {key: tuple(value) if isinstance(value, list) else value
                 for key, value in model_info["preprocessing"].items()}
    described.setdefault("framing", "center_crop")  # snapshots from before framing was a setting
    preprocessing = Preprocessing(**described)
    pca = None
    if model_info.get("pca_sha256"):
        pca = PcaProjection.from_bytes((snapshot_dir / MODEL_PCA_PATH).read_bytes())
    spec = ModelSpec(weights_sha256=model_info["weights_sha256"], architecture=model_info["name"],
                     preprocessing=preprocessing, pooling=model_info.get("pooling", "gem"),
                     gem_p=model_info.get("gem_p") or 3.0, pca=pca)
    if model_version(spec) != model_info["version"]:
        raise SnapshotError(f"rebuilt model version {model_version(spec)} differs from the snapshot's "
                            f"{model_info['version']}: this catalog-index computes vectors differently; install the "
                            "release that built the snapshot")
    return spec


def embed_query_images(paths_or_urls: list[str], model_info: dict, snapshot_dir: Path,
                       device: str = "cpu") -> tuple[np.ndarray, dict[int, str]]:
    """(vectors of the readable images in query order, {query position: error}) with the snapshot's model.

    The model is loaded once per process (`pipelines.embedding.get_embedder` caches it).
    """
    # torch: kept out of import time (the model loads only to embed query images)
    from pipelines.embed import get_embedder

    spec = model_spec_from_manifest(model_info, Path(snapshot_dir))
    errors: dict[int, str] = {}
    items = []
    for position, location in enumerate(paths_or_urls):
        try:
            items.append((str(position), read_uri_bytes(location)))
        except (StorageError, OSError) as exc:
            errors[position] = f"cannot read: {exc}"
        except Exception as exc:  # requests' connection errors and friends: report, go on
            errors[position] = f"cannot read: {type(exc).__name__}: {exc}"
    vectors: dict[int, np.ndarray] = {}
    if items:
        embedder = get_embedder(spec, device)
        for batch in embedder.embed_images(items):
            for key, vector in zip(batch.embeddings["sha256"], batch.embeddings["vector"]):
                vectors[int(key)] = np.asarray(vector, dtype=np.float32)
            for key, reason, detail in zip(batch.failures["sha256"], batch.failures["reason"], batch.failures["detail"]):
                errors[int(key)] = f"{reason}: {detail}"
    ordered = [vectors[i] for i in range(len(paths_or_urls)) if i not in errors]
    dim = int(model_info.get("dim") or 0)
    return (np.vstack(ordered) if ordered else np.empty((0, dim), dtype=np.float32)), errors
