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
import re
import tempfile
from functools import lru_cache
from pathlib import Path

from pipelines.errors import StageRefused, UsageError, VerificationFailed
from pipelines.layout import latest_key, snapshot_prefix
from pipelines.storage import ObjectTooLarge, SizeMismatch, Storage, StorageError

MANIFEST_FILE = "manifest.json"      # written by publish; its sha256 is recorded in LATEST
MANIFEST_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "snapshot_manifest.schema.json"
BUILD_FILE = "_build.json"           # written by build-index: shards, vectors, recall; not for readers
METRIC = "inner_product"             # vectors are L2-normalised: inner product = cosine
MODEL_PCA_PATH = "model/pca.npz"     # the PCA the vectors were projected with, when there is one
RECALL_K = 10                        # recall@K measured per shard and recorded in the manifest

# Caps on what a reader reads of LATEST, a manifest or a build report: the warehouse may be written by more
# than the pipeline, and a 10 GB "manifest.json" must not be read into a serving host's memory. LATEST holds
# one JSON pointer of ~200 bytes. A manifest takes ~1.6 KB per shard (the shard's entry with its two file
# records, the same two records in `files`, one line per category name) and _build.json ~1.2 KB: 64 MiB is
# ~40,000 shards (40 billion vectors at the default index.max_vectors_per_shard) or ~1 million category
# names, far past any catalog. publish refuses to write a manifest past the cap, so every published
# snapshot can be pulled.
LATEST_MAX_BYTES = 64 * 1024
MANIFEST_MAX_BYTES = 64 * 1024 * 1024
BUILD_MAX_BYTES = MANIFEST_MAX_BYTES


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


class PointerInvalid(VerificationFailed):
    """What the warehouse says (LATEST, a manifest) names a snapshot or index this reader will not
    trust: an id outside the schema's pattern, or a manifest of another snapshot. Never serve it."""


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


def _schema_pattern(*path: str) -> re.Pattern:
    node = manifest_schema()["properties"]
    for name in path[:-1]:
        node = node[name]["properties"]
    return re.compile(node[path[-1]]["pattern"])


@lru_cache(maxsize=1)
def snapshot_id_pattern() -> re.Pattern:
    return _schema_pattern("snapshot_id")


@lru_cache(maxsize=1)
def index_name_pattern() -> re.Pattern:
    return _schema_pattern("index_name")


def is_snapshot_id(value) -> bool:
    """True for a string the manifest schema accepts as a snapshot id (`20261123T031500.123Z-1a2b`):
    one plain path segment, never `..`, `/x` or an empty name."""
    return isinstance(value, str) and bool(snapshot_id_pattern().fullmatch(value))


def check_snapshot_id(value, where: str, error: type[Exception] = PointerInvalid) -> str:
    """`value` if it is a valid snapshot id; else `error` saying where it came from. Ids read from the
    warehouse are paths on every serving host: nothing else may ever be joined to a directory."""
    if not is_snapshot_id(value):
        raise error(f"{where} names snapshot {str(value)[:80]!r}, which is not a snapshot id "
                    f"(pattern {snapshot_id_pattern().pattern}); refusing it. "
                    "`catalog-index snapshots` lists the real ones; `catalog-index rollback --to ID` repoints LATEST")
    return value


def check_index_name(value, where: str = "index name", error: type[Exception] = UsageError) -> str:
    if not (isinstance(value, str) and index_name_pattern().fullmatch(value)):
        raise error(f"{where} {str(value)[:80]!r} is not a valid index name (pattern {index_name_pattern().pattern})")
    return value


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------
# reading the warehouse
# ------------------------------------------------------------------------------------------

def parse_latest(text: str, where: str) -> dict:
    """The pointer held by a LATEST object, checked: a valid snapshot id, a sha256 if any."""
    text = text.strip()
    try:
        pointer = json.loads(text)
    except json.JSONDecodeError:
        pointer = {"snapshot_id": text}  # a hand-written pointer holding just the id
    if not isinstance(pointer, dict) or not pointer.get("snapshot_id"):
        raise PointerInvalid(f"{where} does not name a snapshot ({text[:80]!r}): "
                             "point it at a snapshot with `catalog-index rollback --to ID`")
    check_snapshot_id(pointer["snapshot_id"], where)
    sha = pointer.get("manifest_sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise PointerInvalid(f"{where} holds a malformed manifest_sha256 ({str(sha)[:80]!r}): "
                             "repoint it with `catalog-index rollback --to ID`")
    return pointer


def read_latest(storage: Storage, index_name: str) -> dict | None:
    """{snapshot_id, manifest_sha256, updated_at, action} from LATEST, or None before the first publish.

    Raises PointerInvalid when LATEST does not name a valid snapshot id."""
    check_index_name(index_name)
    key = latest_key(index_name)
    if not storage.exists(key):
        return None
    try:
        text = storage.read_text(key, LATEST_MAX_BYTES)
    except ObjectTooLarge as exc:
        raise latest_too_large(exc) from exc
    return parse_latest(text, storage.uri_for(key))


def latest_too_large(exc: ObjectTooLarge) -> PointerInvalid:
    return PointerInvalid(f"{exc}: publish writes a pointer of a few hundred bytes, so this LATEST is damaged or "
                          "was written by something else; refusing it. Repoint it with `catalog-index rollback --to ID`")


def read_manifest_bytes(storage: Storage, index_name: str, snapshot_id: str) -> bytes:
    """The bytes of a snapshot's manifest.json, at most MANIFEST_MAX_BYTES (SnapshotVerificationError beyond:
    never serve it); StorageError when it cannot be read."""
    key = snapshot_prefix(index_name, snapshot_id) + MANIFEST_FILE
    try:
        return storage.read_bytes(key, MANIFEST_MAX_BYTES)
    except ObjectTooLarge as exc:
        raise SnapshotVerificationError(
            f"{exc}: a manifest takes about 2 KB per shard, so the warehouse copy of snapshot {snapshot_id} is damaged "
            "or hostile; refusing it. Roll back (`catalog-index rollback --to ID`) or republish", [MANIFEST_FILE]) from exc


def load_manifest(storage: Storage, index_name: str, snapshot_id: str,
                  expected_sha256: str | None = None) -> tuple[dict, bytes]:
    """(validated manifest, its bytes) of one snapshot: capped read, the sha256 LATEST recorded
    (when given), then the schema and the snapshot it must describe. StorageError when it cannot
    be read: each caller says what that means for its command."""
    key = snapshot_prefix(index_name, snapshot_id) + MANIFEST_FILE
    data = read_manifest_bytes(storage, index_name, snapshot_id)
    if expected_sha256 and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise SnapshotVerificationError(f"{storage.uri_for(key)} does not match the sha256 recorded in LATEST: "
                                        "the manifest was changed after publishing; do not serve it", [MANIFEST_FILE])
    return parse_manifest(data, storage.uri_for(key), index_name, snapshot_id), data


def read_manifest(storage: Storage, index_name: str, snapshot_id: str, expected_sha256: str | None = None) -> dict:
    """The validated manifest of one snapshot; it must describe that snapshot of that index."""
    check_index_name(index_name)
    check_snapshot_id(snapshot_id, f"a request for index {index_name!r}", PublishError)
    try:
        return load_manifest(storage, index_name, snapshot_id, expected_sha256)[0]
    except StorageError as exc:
        raise PublishError(f"snapshot {snapshot_id} of index {index_name!r} has no manifest ({exc}); "
                           "`catalog-index snapshots` lists the published ones") from exc


def parse_manifest(data: bytes, where: str, index_name: str, snapshot_id: str) -> dict:
    """Validate manifest bytes against the schema and against the snapshot they were found under."""
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestInvalid(f"{where} is not JSON ({exc})") from exc
    validate_manifest(manifest, where)
    if manifest["snapshot_id"] != snapshot_id or manifest["index_name"] != index_name:
        raise PointerInvalid(f"{where} describes snapshot {manifest['snapshot_id']!r} of index "
                             f"{manifest['index_name']!r}, not {snapshot_id!r} of {index_name!r}: a manifest was copied "
                             "or written under the wrong name; do not serve it")
    return manifest


def read_build(storage: Storage, index_name: str, snapshot_id: str) -> dict:
    check_snapshot_id(snapshot_id, "--snapshot-id", PublishError)
    key = snapshot_prefix(index_name, snapshot_id) + BUILD_FILE
    if not storage.exists(key):
        raise PublishError(f"{storage.uri_for(key)} does not exist: snapshot {snapshot_id} was never built "
                           "(or its build stopped early); run build-index")
    return json.loads(storage.read_text(key, BUILD_MAX_BYTES))


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
                storage.download_file(prefix + record["path"], local, expected_bytes=record["bytes"])
            except SizeMismatch as exc:
                bad.append(f"{record['path']} ({exc.found}; expected {record['bytes']} bytes)")
                continue
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


def contained_path(root: Path, relative: str) -> Path:
    """`root / relative`, refused unless it stays strictly under `root`: every path a pull writes or a
    client opens comes from a manifest, which is warehouse content, not ours."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if path == root or root not in path.parents:
        raise PointerInvalid(f"manifest path {relative!r} leaves the snapshot directory {root}; refusing the snapshot")
    return path
