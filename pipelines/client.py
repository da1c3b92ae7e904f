"""Serving side: pull the newest good snapshot to local disk, open it once, search it.

    pull("s3://search/warehouse", "/srv/catalog-index")      # resolve LATEST, download, verify, swap
    client = SnapshotClient("/srv/catalog-index")             # opens <dest>/current, loads every shard
    client.search_images(["shoe.jpg"], k=10, category="shoes")
    client.search_vectors(vectors, k=10)

A pulled destination looks like:

    <dest>/snapshots/<snapshot_id>/   manifest.json, shards/, idmaps/, model/ (verified copies)
    <dest>/current -> snapshots/<id>  a symlink, replaced atomically (rename) after verification

A process that has a snapshot open keeps searching it while a pull swaps `current`; reopen to
pick up the new one. Search merges each relevant shard's top hits, maps vectors to products
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipelines.config import S3Settings
from pipelines.errors import UsageError
from pipelines.layout import snapshot_prefix
from pipelines.snapshot import (MANIFEST_FILE, MODEL_PCA_PATH, PointerInvalid, SnapshotVerificationError,
                                apply_search_params, check_index_name, parse_manifest, read_latest, sha256_of_file,
                                validate_manifest)
from pipelines.storage import StorageError, open_storage

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


def contained_path(root: Path, relative: str) -> Path:
    """`root / relative`, refused unless it stays strictly under `root`: every path a pull writes or a
    client opens comes from a manifest, which is warehouse content, not ours."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if path == root or root not in path.parents:
        raise PointerInvalid(f"manifest path {relative!r} leaves the snapshot directory {root}; refusing the snapshot")
    return path


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
    check_index_name(index_name, "--index-name")
    storage = open_storage(warehouse, s3)
    pointer = read_latest(storage, index_name)  # the id is checked there: it becomes a local directory name
    if pointer is None:
        raise SnapshotError(f"index {index_name!r} has no published snapshot in {warehouse} (no LATEST): "
                            "run build-index and publish first")
    snapshot_id = pointer["snapshot_id"]
    expected_manifest_sha = pointer.get("manifest_sha256")
    snapshots = dest / "snapshots"
    with _pull_lock(dest):
        previous = current_snapshot_id(dest)
        final = contained_path(snapshots, snapshot_id)
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
    manifest = parse_manifest(manifest_data, storage.uri_for(prefix + MANIFEST_FILE), index_name, snapshot_id)
    snapshots.mkdir(parents=True, exist_ok=True)
    staging = snapshots / f".partial-{snapshot_id}-{secrets.token_hex(4)}"
    try:
        bad = []
        for record in manifest["files"]:
            local = contained_path(staging, record["path"])
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
        final = contained_path(snapshots, snapshot_id)
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


class _Shard:
    """One loaded shard: its FAISS index and its id map as column arrays sorted by vector id."""

    def __init__(self, root: Path, entry: dict):
        import faiss
        import pyarrow.parquet as pq

        self.entry = entry
        self.shard_id = entry["shard_id"]
        self.categories = set(entry["categories"])
        self.index = faiss.read_index(str(contained_path(root, entry["files"]["index"]["path"])))
        self.params = dict(entry.get("search_params") or {})
        apply_search_params(self.index, self.params)
        self.kind = entry["index_type"]
        table = pq.read_table(contained_path(root, entry["files"]["idmap"]["path"])).sort_by([("vector_id", "ascending")])
        self.vector_ids = table.column("vector_id").to_numpy()
        self.columns = {name: np.array(table.column(name).to_pylist(), dtype=object)
                        for name in ("product_id", "category", "image_url", "title", "sha256")}
        # rows of vector v are offsets[v]:offsets[v+1]
        self.offsets = np.searchsorted(self.vector_ids, np.arange(self.index.ntotal + 1))
        self._category_ids: dict[str, np.ndarray] = {}

    def ids_in_category(self, category: str) -> np.ndarray:
        if category not in self._category_ids:
            rows = self.columns["category"] == category
            self._category_ids[category] = np.unique(self.vector_ids[rows]).astype(np.int64)
        return self._category_ids[category]

    def search(self, queries: np.ndarray, k: int, category: str | None) -> tuple[np.ndarray, np.ndarray]:
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


class SnapshotClient:
    """A snapshot opened once for many searches: a pull destination (uses `current`) or a snapshot dir.

    `verify=True` re-hashes every file on open (a pull already did; use it for hand-copied dirs).
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False, device: str = "cpu"):
        path = Path(path).expanduser()
        if (path / MANIFEST_FILE).is_file():
            root = path
        elif (path / "current").exists():
            root = (path / "current").resolve()  # pinned: a later pull does not move this client
        else:
            raise SnapshotError(f"{path} holds no manifest.json and no 'current' snapshot: pass a pulled "
                                "destination or a snapshot directory (catalog-index pull --warehouse W --dest DIR)")
        self.root = root
        self.device = device
        self.manifest = validate_manifest(json.loads((root / MANIFEST_FILE).read_text()), str(root / MANIFEST_FILE))
        self._check_files(verify)
        self.shards = [_Shard(root, entry) for entry in self.manifest["shards"]]
        self.dimension = int(self.manifest["dimension"])

    @property
    def snapshot_id(self) -> str:
        return self.manifest["snapshot_id"]

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

    def search_vectors(self, queries: np.ndarray, k: int = 10, category: str | None = None) -> list[list[Hit]]:
        """Top-k products per query vector, each product once (its best-scoring image), best first."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dimension:
            raise SnapshotError(f"query vectors have dimension {queries.shape[1]}, snapshot {self.snapshot_id} "
                                f"holds {self.dimension}: embed with model {self.manifest['model']['version']}")
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = np.ascontiguousarray(queries / np.maximum(norms, 1e-12))  # scores are cosine similarities
        shards = [s for s in self.shards if category is None or category in s.categories]
        results: list[list[Hit]] = [[] for _ in range(len(queries))]
        if not shards or k <= 0:
            return results
        pending = np.arange(len(queries))
        fetch = 2 * k
        while len(pending):
            best: list[dict[str, Hit]] = [{} for _ in pending]
            exhausted = True
            for shard in shards:
                scores, ids = shard.search(queries[pending], fetch, category)
                if ids.shape[1] >= fetch and fetch < shard.index.ntotal:
                    exhausted = False
                for row in range(len(pending)):
                    for score, vector_id in zip(scores[row], ids[row]):
                        if vector_id < 0:
                            continue
                        for r in shard.rows_of(int(vector_id)):
                            if category is not None and shard.columns["category"][r] != category:
                                continue
                            product = shard.columns["product_id"][r]
                            if product not in best[row] or best[row][product].score < score:
                                best[row][product] = Hit(product, shard.columns["category"][r], float(score),
                                                         shard.columns["image_url"][r], shard.columns["title"][r],
                                                         shard.columns["sha256"][r], shard.shard_id)
            still_short = []
            for row, query_index in enumerate(pending):
                ranked = sorted(best[row].values(), key=lambda hit: (-hit.score, hit.product_id))
                results[query_index] = ranked[:k]
                if len(ranked) < k and not exhausted:
                    still_short.append(query_index)  # one product had several images: fetch deeper
            pending = np.array(still_short, dtype=np.int64)
            fetch *= 4
        return results

    # -- images ----------------------------------------------------------------------------

    def search_images(self, paths_or_urls: Sequence[str], k: int = 10, category: str | None = None) -> list[QueryResult]:
        """Embed each image with the snapshot's model version, then `search_vectors`. A query image
        that cannot be read or decoded gets an `error` and no results; the others go on."""
        vectors, errors = embed_query_images(list(paths_or_urls), self.manifest["model"], self.root, self.device)
        ok = [i for i in range(len(paths_or_urls)) if i not in errors]
        hits = self.search_vectors(vectors, k, category) if ok else []
        out = [QueryResult(str(query), error=errors.get(i)) for i, query in enumerate(paths_or_urls)]
        for i, result in zip(ok, hits):
            out[i].results = result
        return out


def model_spec_from_manifest(model_info: dict, snapshot_dir: Path):
    """Rebuild the ModelSpec a snapshot was built with; refuse if this installation gives other vectors."""
    from pipelines.embed.model import ModelSpec, PcaProjection, Preprocessing, model_version

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
    from pipelines.embed.embedder import get_embedder
    from pipelines.storage import read_uri_bytes

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
