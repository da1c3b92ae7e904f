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
opens the new one beside it and swaps (searches already running finish on the old one). Opening
and searching one snapshot directory is `pipelines.search.OpenSnapshot`, immutable once open: the
search service (`pipelines.serve`) holds two of them during a swap. Shards can be memory-mapped (`mmap=True`); id maps are Arrow columns, never one
Python object per row. Search merges each relevant shard's top hits, maps vectors to products
through the id maps and returns each product once, best score first.

This module must never start Spark, never serve a file whose checksum it has not verified on
pull, and never modify the warehouse.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pipelines.config import S3Settings
from pipelines.layout import snapshot_prefix
from pipelines.search import (VERIFIED_MARKER, Hit, OpenSnapshot, QueryResult, SnapshotError,  # noqa: F401
                              locally_verified as _locally_verified)
from pipelines.snapshot import (MANIFEST_FILE, MODEL_PCA_PATH, SnapshotVerificationError, check_index_name,
                                contained_path, load_manifest, read_latest, sha256_of_file)
from pipelines.storage import SizeMismatch, StorageError, open_storage, read_uri_bytes

# Free space a pull leaves on top of what the manifest declares (and 5% of it): filesystem blocks rounded up
# per file, the marker, and room for whatever else writes to that disk meanwhile.
FREE_SPACE_MARGIN_BYTES = 256 * 1024 * 1024


class InsufficientSpace(SnapshotError):
    """The destination lacks the free space the snapshot's manifest declares: nothing was downloaded."""


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


def pull(warehouse: str, dest: str | os.PathLike, *, s3: S3Settings | None = None, index_name: str = "catalog",
         keep_local: int = 2) -> PullResult:
    """Make `<dest>/current` the snapshot LATEST names, verified file by file; no-op when it already is.

    Raises SnapshotVerificationError (and leaves `current` untouched) when any file's size or
    sha256 differs from the manifest, or the manifest from the sha256 recorded in LATEST.
    Nothing the warehouse holds makes it read or write unbounded bytes: LATEST and the manifest are
    read up to a cap (snapshot.LATEST_MAX_BYTES, MANIFEST_MAX_BYTES); InsufficientSpace, before any
    download, when the files the manifest declares do not fit the free space at `dest`; and no file
    is written past the size its manifest record declares.
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
        manifest, manifest_data = load_manifest(storage, index_name, snapshot_id, expected_manifest_sha)
    except StorageError as exc:
        raise SnapshotError(f"LATEST names {snapshot_id} but its manifest cannot be read ({exc}); "
                            "it may have been retired meanwhile: pull again") from exc
    snapshots.mkdir(parents=True, exist_ok=True)
    _check_free_space(snapshots, snapshot_id, sum(record["bytes"] for record in manifest["files"]) + len(manifest_data))
    staging = snapshots / f".partial-{snapshot_id}-{secrets.token_hex(4)}"
    try:
        bad = []
        for record in manifest["files"]:
            local = contained_path(staging, record["path"])
            try:  # never more than the manifest's size on disk, whatever the object holds
                storage.download_file(prefix + record["path"], local, expected_bytes=record["bytes"])
            except SizeMismatch as exc:
                bad.append(f"{record['path']} ({exc.found}; manifest says {record['bytes']} bytes)")
                continue
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
                + ". The warehouse copy is damaged or hostile: roll back (`catalog-index rollback --to ID`) or republish",
                bad)
        (staging / MANIFEST_FILE).write_bytes(manifest_data)
        (staging / VERIFIED_MARKER).write_text(hashlib.sha256(manifest_data).hexdigest() + "\n")
        final = contained_path(snapshots, snapshot_id)
        if final.exists():  # an unverified leftover of an interrupted copy
            shutil.rmtree(final)
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_free_space(directory: Path, snapshot_id: str, needed: int) -> None:
    """Refuse, before any download, a snapshot whose declared size (plus a margin) exceeds the free space."""
    free = shutil.disk_usage(directory).free
    needed += FREE_SPACE_MARGIN_BYTES + needed // 20  # integers: a hostile manifest may declare 10**100 bytes
    if needed > free:
        raise InsufficientSpace(f"snapshot {snapshot_id} needs {_gigabytes(needed)} GB (its files, plus a "
                                f"margin), only {_gigabytes(free)} GB free at {directory}: free space or pull elsewhere")


def _gigabytes(size: int) -> str:
    """Decimal GB with one digit, in integers: exact for any size."""
    tenths = (size + 50_000_000) // 100_000_000
    return f"{tenths // 10:,}.{tenths % 10}"


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
    def shards(self) -> list:
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
