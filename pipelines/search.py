"""Open one snapshot directory and search it: shards (memory-mapped or in RAM), id maps as Arrow
columns, per-shard search (category filters included) and the merge into unique products.

An `OpenSnapshot` is immutable once open, so a search holding a reference finishes on it while a
newer one is opened beside it: `SnapshotClient.refresh()` and the search service
(`pipelines.serve`) swap references, never contents. This module trusts nothing in the
directory it has not checked: the manifest against its schema, file sizes always and sha256s
unless `pull`'s `.verified` marker vouches for exactly this manifest, paths stay inside the
directory, id maps name only vector ids the index holds. It never modifies a snapshot and never
imports the index build.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipelines.errors import UsageError
from pipelines.snapshot import (MANIFEST_FILE, SnapshotVerificationError, apply_search_params, contained_path,
                                sha256_of_file, validate_manifest)

VERIFIED_MARKER = ".verified"   # written by `pull` beside a snapshot it verified: the manifest's sha256


class SnapshotError(UsageError):
    """A snapshot cannot be pulled or opened; the message says what to do."""



def locally_verified(directory: Path, manifest_sha256: str | None) -> bool:
    marker = directory / VERIFIED_MARKER
    if not marker.is_file() or not (directory / MANIFEST_FILE).is_file():
        return False
    if manifest_sha256 is None:
        return True
    return sha256_of_file(directory / MANIFEST_FILE)[0] == manifest_sha256


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
        index_path = contained_path(root, entry["files"]["index"]["path"])
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
        table = pq.read_table(contained_path(root, entry["files"]["idmap"]["path"]), columns=["vector_id", *IDMAP_COLUMNS],
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
            verify = not locally_verified(root, self.manifest_sha256)
        self.verified = bool(verify) or locally_verified(root, self.manifest_sha256)
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
            local = contained_path(self.root, record["path"])
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


