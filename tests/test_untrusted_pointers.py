"""A warehouse may be written by more than the pipeline: LATEST and manifests are untrusted input.

Whatever LATEST or a manifest says, `pull` writes nothing outside its destination, removes
nothing it does not own, and refuses (exit 1) a pointer that names no valid snapshot id or a
manifest that describes another snapshot; `rollback --to` refuses ids that are not ids (exit 2).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pipelines.cli import main as cli_main
from pipelines.client import SnapshotClient, contained_path, current_snapshot_id, pull
from pipelines.config import load_settings
from pipelines.config import IndexSettings
from pipelines.index import build_index
from pipelines.layout import latest_key, snapshot_prefix
from pipelines.publish import publish_snapshot, rollback
from pipelines.snapshot import (ManifestInvalid, PointerInvalid, PublishError, check_snapshot_id, is_snapshot_id,
                                manifest_bytes, read_latest)
from pipelines.errors import UsageError
from pipelines.storage import open_storage
from synthetic_catalog import MODEL, write_catalog

CFG = IndexSettings(max_vectors_per_shard=100, flat_max_vectors=1000, recall_queries=10)
HOSTILE_IDS = ["/srv/x", "..", ".", "../victim", "../../etc", "", " ", "a/b", "snapshots", "current",
               "20261123T031500.123Z-abcd/..", "20261123T031500.123Z-abcd\n", "20261123T031500.123Z-ABCD",
               "20261123T031500.123Z-abcd/../../victim", "\x00", "~root", "20261123T031500Z"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Two published snapshots of a small catalog, and a victim directory beside the pull destination."""
    root = tmp_path_factory.mktemp("untrusted")
    uri = (root / "warehouse").as_uri()
    storage = open_storage(uri)
    write_catalog(storage, "r1", {"food": 60, "tools": 40})
    settings = load_settings(warehouse=uri)
    ids = []
    for _ in range(2):
        built = build_index(settings, "r1", model=MODEL, cfg=CFG, runner="local")
        ids.append(publish_snapshot(storage, "catalog", snapshot_id=built.snapshot_id).snapshot_id)
    return root, uri, storage, ids


@pytest.fixture
def serving(published, tmp_path):
    """A destination that already serves the live snapshot, and a victim directory next to it."""
    root, uri, storage, ids = published
    original = storage.read_bytes(latest_key("catalog"))
    dest = tmp_path / "serving"
    pull(uri, dest)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    yield uri, storage, ids, dest, victim
    storage.write_bytes(latest_key("catalog"), original)


def _tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _pointer(snapshot_id, sha: str | None = None) -> bytes:
    return json.dumps({"snapshot_id": snapshot_id, "manifest_sha256": sha, "action": "publish"}).encode()


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
def test_pull_refuses_a_latest_that_names_no_snapshot_id(serving, hostile, tmp_path):
    uri, storage, ids, dest, victim = serving
    before_dest, before_victim = _tree(dest), _tree(victim)
    plain = [] if is_snapshot_id(hostile.strip()) else [hostile.encode()]  # a plain LATEST is read stripped
    for body in [_pointer(hostile), *plain]:
        storage.write_bytes(latest_key("catalog"), body)
        with pytest.raises(PointerInvalid):
            pull(uri, dest)
    assert _tree(victim) == before_victim and _tree(dest) == before_dest
    assert current_snapshot_id(dest) == ids[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving", "victim"]   # nothing created beside dest


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.one_of(st.text(max_size=40), st.lists(st.text(max_size=5), max_size=2), st.integers(), st.none(),
                      st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)))
def test_pull_never_writes_outside_its_destination_whatever_latest_holds(serving, junk):
    uri, storage, ids, dest, victim = serving
    before_victim = _tree(victim)
    storage.write_bytes(latest_key("catalog"), _pointer(junk))
    if is_snapshot_id(junk):  # vanishingly rare: a well-formed id that names no snapshot
        with pytest.raises(Exception):
            pull(uri, dest)
    else:
        with pytest.raises(PointerInvalid):
            pull(uri, dest)
    assert _tree(victim) == before_victim
    assert current_snapshot_id(dest) == ids[-1]
    assert {p.name for p in (dest / "snapshots").iterdir()} <= set(ids)


def test_a_manifest_of_another_snapshot_is_refused_by_pull_and_rollback(serving):
    """LATEST names a real id, but the manifest stored under it (with a matching sha in LATEST)
    describes another snapshot, or another index: never served, never made live."""
    uri, storage, ids, dest, _ = serving
    first, second = ids
    prefix = snapshot_prefix("catalog", second)
    original_manifest = storage.read_bytes(prefix + "manifest.json")
    other = json.loads(storage.read_bytes(snapshot_prefix("catalog", first) + "manifest.json"))
    try:
        for forged in (other, {**json.loads(original_manifest), "index_name": "other"}):
            data = manifest_bytes(forged)
            storage.write_bytes(prefix + "manifest.json", data)
            storage.write_bytes(latest_key("catalog"), _pointer(second, hashlib.sha256(data).hexdigest()))
            (dest / "snapshots" / second).exists() and __import__("shutil").rmtree(dest / "snapshots" / second)
            os.unlink(dest / "current")
            with pytest.raises(PointerInvalid, match="describes snapshot"):
                pull(uri, dest)
            assert not (dest / "snapshots" / second).exists()
            storage.write_bytes(latest_key("catalog"), _pointer(first))
            with pytest.raises(PointerInvalid, match="describes snapshot"):
                rollback(storage, "catalog", second)
            assert read_latest(storage, "catalog")["snapshot_id"] == first
            pull(uri, dest)
    finally:
        storage.write_bytes(prefix + "manifest.json", original_manifest)


@pytest.mark.parametrize("path", ["shards/../../victim/precious.txt", "/etc/passwd", "shards/..", "idmaps/.hidden",
                                  "model/../../../x", "shards/a/b"])
def test_a_manifest_file_path_outside_the_snapshot_is_refused(serving, path):
    uri, storage, ids, dest, victim = serving
    second = ids[-1]
    prefix = snapshot_prefix("catalog", second)
    original_manifest = storage.read_bytes(prefix + "manifest.json")
    manifest = json.loads(original_manifest)
    manifest["files"][0]["path"] = path
    data = manifest_bytes(manifest)
    try:
        storage.write_bytes(prefix + "manifest.json", data)
        storage.write_bytes(latest_key("catalog"), _pointer(second, hashlib.sha256(data).hexdigest()))
        (dest / "current").unlink()
        __import__("shutil").rmtree(dest / "snapshots" / second)
        with pytest.raises(ManifestInvalid, match="files/0/path"):
            pull(uri, dest)
        assert _tree(victim) == {"precious.txt": b"keep me"}
    finally:
        storage.write_bytes(prefix + "manifest.json", original_manifest)


@settings(max_examples=200, deadline=None)
@given(relative=st.lists(st.sampled_from([".", "/", "a", "b", "\\", "~", "\x00", "..", "/..", "shards/"]),
                         max_size=12).map("".join))
def test_contained_path_only_ever_returns_paths_strictly_under_the_root(tmp_path_factory, relative):
    root = tmp_path_factory.getbasetemp() / "contained"
    root.mkdir(exist_ok=True)
    try:
        path = contained_path(root, relative)
    except (PointerInvalid, ValueError):  # ValueError: an embedded NUL
        return
    assert root.resolve() in path.parents


def test_a_symlinked_snapshot_directory_is_not_followed(serving):
    uri, storage, ids, dest, victim = serving
    first, second = ids
    storage.write_bytes(latest_key("catalog"), _pointer(first))
    __import__("shutil").rmtree(dest / "snapshots" / first, ignore_errors=True)
    os.symlink(victim, dest / "snapshots" / first)
    with pytest.raises(PointerInvalid, match="leaves the snapshot directory"):
        pull(uri, dest)
    assert _tree(victim) == {"precious.txt": b"keep me"}


def test_rollback_and_pull_refuse_ids_and_names_that_are_not_ids(published, tmp_path, capsys):
    _, uri, storage, ids = published
    for hostile in HOSTILE_IDS:
        with pytest.raises(PublishError, match="not a snapshot id"):
            rollback(storage, "catalog", hostile)
        with pytest.raises(PublishError):
            check_snapshot_id(hostile, "--to", PublishError)
    assert read_latest(storage, "catalog")["snapshot_id"] == ids[-1]
    assert cli_main(["rollback", "--warehouse", uri, "--to", "../../etc"]) == 2
    assert "not a snapshot id" in capsys.readouterr().err.replace("\n", " ")
    for name in ("../x", "/abs", "", ".hidden"):
        with pytest.raises(UsageError, match="not a valid index name"):
            pull(uri, tmp_path / "d", index_name=name)
    assert not (tmp_path / "d").exists()


def test_cli_pull_exits_1_on_a_hostile_latest(serving, capsys):
    uri, storage, ids, dest, victim = serving
    storage.write_bytes(latest_key("catalog"), _pointer("/srv/x"))
    assert cli_main(["pull", "--warehouse", uri, "--dest", str(dest)]) == 1
    assert "not a snapshot id" in capsys.readouterr().err.replace("\n", " ")
    assert current_snapshot_id(dest) == ids[-1]
    client = SnapshotClient(dest)
    assert client.snapshot_id == ids[-1]
