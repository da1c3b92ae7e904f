"""Latency measured where it is made: build-index records per-shard p50/p99 at the tuned search
parameters in the manifest (schema-compatible: older manifests without it stay valid), and
`catalog-index score` re-measures recall@10 and latency of a pulled snapshot."""
from __future__ import annotations

import copy
import json
import shutil

import pytest

import pipelines.cli as cli
from pipelines.client import pull
from pipelines.config import IndexSettings, load_settings
from pipelines.index import build_index
from pipelines.publish import publish_snapshot
from pipelines.snapshot import validate_manifest
from pipelines.storage import open_storage
from synthetic_catalog import MODEL, write_catalog

MIXED_CFG = IndexSettings(max_vectors_per_shard=370, flat_max_vectors=120, hnsw_max_vectors=340, recall_queries=40)


@pytest.fixture
def pulled(tmp_path):
    def make(cfg: IndexSettings):
        uri = (tmp_path / f"warehouse-{id(cfg)}").as_uri()
        storage = open_storage(uri)
        write_catalog(storage, "r1", {"food": 400, "tools": 250, "toys": 120})
        built = build_index(load_settings(warehouse=uri), "r1", model=MODEL, cfg=cfg, runner="local")
        manifest = publish_snapshot(storage, "catalog", snapshot_id=built.snapshot_id).manifest
        dest = tmp_path / f"serving-{id(cfg)}"
        pull(uri, dest)
        return manifest, dest
    return make


def score_cli(capsys, directory) -> tuple[int, dict]:
    code = cli.main(["score", "--snapshot-dir", str(directory), "--queries", "60", "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_the_manifest_records_latency_and_score_re_measures_it(pulled, capsys):
    manifest, dest = pulled(MIXED_CFG)
    for shard in manifest["shards"]:
        latency = shard["search_latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"] and latency["queries"] == shard["recall_queries"] > 0
    old_style = copy.deepcopy(manifest)
    for shard in old_style["shards"]:
        del shard["search_latency_ms"]
    validate_manifest(old_style)  # a manifest from before the field is still valid

    code, score = score_cli(capsys, dest)
    assert code == 0 and score["passed"] and score["snapshot_id"] == manifest["snapshot_id"]
    by_id = {s["shard_id"]: s for s in manifest["shards"]}
    assert [s["shard_id"] for s in score["shards"]] == sorted(by_id)
    for shard in score["shards"]:
        built = by_id[shard["shard_id"]]
        assert shard["manifest_latency_ms"] == built["search_latency_ms"]
        assert shard["manifest_recall_at_10"] == built["recall_at_10"]
        assert 0 < shard["p50_ms"] <= shard["p99_ms"]
        if shard["index_type"] == "flat":
            assert shard["recall_at_10"] == 1.0  # exact search finds exactly the exact top-10
        assert shard["recall_at_10"] >= manifest["recall_at_10"]["threshold"]
    assert 0 < score["search_p50_ms"] <= score["search_p99_ms"]


def test_score_fails_a_snapshot_below_its_threshold(pulled, capsys, tmp_path):
    # nprobe=1: IVF misses neighbours in the lists it does not probe. The build's gate is off
    # (min_recall 0); a copy whose manifest asks for 1.0 must be reported as below it.
    manifest, dest = pulled(IndexSettings(max_vectors_per_shard=370, flat_max_vectors=120, hnsw_max_vectors=0,
                                          nprobe=1, min_recall=0.0, recall_queries=40))
    assert any(s["index_type"].startswith("ivf") for s in manifest["shards"])
    copy_dir = tmp_path / "strict"
    shutil.copytree((dest / "current").resolve(), copy_dir)
    (copy_dir / ".verified").unlink()
    strict = json.loads((copy_dir / "manifest.json").read_text())
    strict["recall_at_10"]["threshold"] = 1.0
    (copy_dir / "manifest.json").write_text(json.dumps(strict))
    code, score = score_cli(capsys, copy_dir)
    assert code == 1 and not score["passed"]
    ivf = [s for s in score["shards"] if s["index_type"].startswith("ivf")]
    assert ivf and min(s["recall_at_10"] for s in ivf) < 1.0
