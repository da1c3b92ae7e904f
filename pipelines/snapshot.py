"""The snapshot contract between build and serve: file names, the manifest schema, reading
`LATEST` and manifests, verifying files, and applying a shard's search parameters.

`build-index` and `publish` write what this module describes; `pull`, the client and the
search service read it. Both sides import this module and never each other, so serving needs
neither Spark nor the index build. This module must never trust what it reads: manifests are
checked against `schemas/snapshot_manifest.schema.json` and files against their sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from pipelines.errors import StageRefused, UsageError, VerificationFailed
from pipelines.layout import latest_key, snapshot_prefix
from pipelines.storage import Storage, StorageError

MANIFEST_FILE = "manifest.json"      # written by publish; its sha256 is recorded in LATEST
MANIFEST_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "snapshot_manifest.schema.json"
BUILD_FILE = "_build.json"           # written by build-index: shards, vectors, recall; not for readers
METRIC = "inner_product"             # vectors are L2-normalised: inner product = cosine
MODEL_PCA_PATH = "model/pca.npz"     # the PCA the vectors were projected with, when there is one
RECALL_K = 10                        # recall@K measured per shard and recorded in the manifest


class PublishError(StageRefused, ValueError):
    """Publishing, listing or rolling back cannot go on; the message says what to do."""

    exit_code = 2  # the CLI has always answered these with 2: fix the input (run id, snapshot id) and rerun


class SnapshotVerificationError(VerificationFailed):
    """A snapshot file is missing or its size/sha256 differs from the manifest: never serve it."""

    def __init__(self, message: str, bad_files: list[str]):
        super().__init__(message)
        self.bad_files = bad_files


class ManifestInvalid(UsageError):
    """manifest.json does not follow the snapshot manifest schema."""


# ------------------------------------------------------------------------------------------
# manifest schema
# ------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def manifest_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate_manifest(manifest: dict, where: str = "manifest") -> dict:
    """Raise ManifestInvalid naming the first offending field; return the manifest unchanged."""
    import jsonschema

    version = manifest.get("manifest_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version > MANIFEST_VERSION:
        raise ManifestInvalid(f"{where} has manifest_version {version}; this catalog-index reads up to "
                              f"{MANIFEST_VERSION}: upgrade catalog-index")
    validator = jsonschema.Draft202012Validator(manifest_schema())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        error = errors[0]
        location = "/".join(map(str, error.absolute_path)) or "(top level)"
        raise ManifestInvalid(f"{where} is not a valid snapshot manifest: at {location}: {error.message}")
    return manifest


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------
# reading the warehouse
# ------------------------------------------------------------------------------------------

def read_latest(storage: Storage, index_name: str) -> dict | None:
    """{snapshot_id, manifest_sha256, updated_at, action} from LATEST, or None before the first publish."""
    key = latest_key(index_name)
    if not storage.exists(key):
        return None
    text = storage.read_text(key).strip()
    try:
        pointer = json.loads(text)
    except json.JSONDecodeError:
        pointer = {"snapshot_id": text}  # a hand-written pointer holding just the id
    if not isinstance(pointer, dict) or not pointer.get("snapshot_id"):
        raise PublishError(f"{storage.uri_for(key)} does not name a snapshot ({text[:80]!r}): "
                           "point it at a snapshot with `catalog-index rollback --to ID`")
    return pointer


def read_manifest(storage: Storage, index_name: str, snapshot_id: str, expected_sha256: str | None = None) -> dict:
    key = snapshot_prefix(index_name, snapshot_id) + MANIFEST_FILE
    try:
        data = storage.read_bytes(key)
    except StorageError as exc:
        raise PublishError(f"snapshot {snapshot_id} of index {index_name!r} has no manifest ({exc}); "
                           "`catalog-index snapshots` lists the published ones") from exc
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise SnapshotVerificationError(f"{storage.uri_for(key)} does not match the sha256 recorded in LATEST: "
                                        "the manifest was changed after publishing; do not serve it", [MANIFEST_FILE])
    return validate_manifest(json.loads(data), storage.uri_for(key))


def read_build(storage: Storage, index_name: str, snapshot_id: str) -> dict:
    key = snapshot_prefix(index_name, snapshot_id) + BUILD_FILE
    if not storage.exists(key):
        raise PublishError(f"{storage.uri_for(key)} does not exist: snapshot {snapshot_id} was never built "
                           "(or its build stopped early); run build-index")
    return json.loads(storage.read_text(key))


# ------------------------------------------------------------------------------------------
# snapshot files
# ------------------------------------------------------------------------------------------

def shard_index_path(shard_id: str) -> str:
    """Path of a shard file inside a snapshot directory (the same locally and in the warehouse)."""
    return f"shards/{shard_id}.faiss"


def shard_idmap_path(shard_id: str) -> str:
    return f"idmaps/{shard_id}.parquet"


def snapshot_files(manifest_or_build: dict) -> list[dict]:
    """Every file of a snapshot except manifest.json, as {path, bytes, sha256, role, count?}."""
    files = []
    for shard in manifest_or_build["shards"]:
        files.append({**shard["files"]["index"], "role": "index", "count": shard["vectors"]})
        files.append({**shard["files"]["idmap"], "role": "idmap", "count": shard["idmap_rows"]})
    files.extend({**record, "role": "model"} for record in manifest_or_build.get("model_files", []))
    return files


def sha256_of_file(path: str | os.PathLike) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
            size += len(block)
    return hasher.hexdigest(), size


def verify_snapshot_files(storage: Storage, prefix: str, files: list[dict]) -> None:
    """Download each file and compare size and sha256; raise SnapshotVerificationError listing every bad one."""
    bad = []
    with tempfile.TemporaryDirectory(prefix="verify-") as scratch:
        for record in files:
            local = Path(scratch) / "file"
            try:
                storage.download_file(prefix + record["path"], local)
            except (StorageError, OSError) as exc:
                bad.append(f"{record['path']} (missing: {exc})")
                continue
            digest, size = sha256_of_file(local)
            local.unlink()
            if size != record["bytes"] or digest != record["sha256"]:
                bad.append(f"{record['path']} ({size} bytes, sha256 {digest[:12]}…; expected {record['bytes']} "
                           f"bytes, {record['sha256'][:12]}…)")
    if bad:
        raise SnapshotVerificationError(f"{len(bad)} file(s) of {storage.uri_for(prefix)} fail verification: "
                                        + "; ".join(bad), bad)


def apply_search_params(index, params: dict[str, int]) -> None:
    """Set nprobe / efSearch on a loaded index (both are also stored in the file itself)."""
    import faiss

    if "nprobe" in params:
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if "efSearch" in params:
        faiss.downcast_index(index).hnsw.efSearch = int(params["efSearch"])
