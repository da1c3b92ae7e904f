"""`catalog-index run` twice on an unchanged catalog: the second night downloads nothing, embeds
nothing, validates nothing again, and publishes the same index as a new snapshot."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.config import load_settings
from pipelines.pipeline import RunContext, run_pipeline
from pipelines.publish import read_latest, read_manifest
from pipelines.sample_catalog import ImageServer, build_sample_manifest, write_manifest_csv
from pipelines.storage import open_storage

FIRST, SECOND = "20261120T020000Z", "20261121T020000Z"
pytestmark = [pytest.mark.spark, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_nights(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-nights")
    settings = load_settings(warehouse=(root / "wh").as_uri(), crawl={"allow_private_hosts": True})
    with ImageServer() as server:
        manifest = write_manifest_csv(build_sample_manifest(server.base_url, 24), root / "manifest.csv")
        reports = [run_pipeline(RunContext(settings, run_id, manifest=str(manifest), spark=spark))
                   for run_id in (FIRST, SECOND)]
    return settings, open_storage(settings.warehouse), reports


def test_the_second_night_downloads_embeds_and_validates_nothing_again(two_nights):
    settings, storage, (first, second) = two_nights
    assert first["crawl"]["fetched"] > 20 and first["embed"]["embedded"] > 0
    assert second["crawl"]["fetched"] == 0 and second["crawl"]["bytes_downloaded"] == 0
    assert second["crawl"]["not_modified"] == first["crawl"]["fetched"]
    assert second["embed"]["embedded"] == 0 and second["embed"]["reused"] == first["embed"]["embedded"]
    for stage in ("manifest", "images", "embeddings", "index"):
        report = second["validation"][stage]
        assert report["extra"].get("reused_validation_of") == FIRST, stage
        assert report["outcome"] == "passed" and report["accounting"] == first["validation"][stage]["accounting"], stage
        assert "reused_validation_of" not in first["validation"][stage]["extra"], stage
        assert storage.exists(f"reports/{SECOND}/gx/{stage}/index.html"), stage
    # every gate was evaluated for the second night itself
    assert {g["name"] for g in second["validation"]["images"]["gates"]} == {
        g["name"] for g in first["validation"]["images"]["gates"]}


def test_the_second_night_publishes_the_same_index_as_a_new_snapshot(two_nights):
    _, storage, (first, second) = two_nights
    latest = read_latest(storage, "catalog")
    after = read_manifest(storage, "catalog", latest["snapshot_id"], latest.get("manifest_sha256"))
    before = read_manifest(storage, "catalog", first["snapshot"]["snapshot_id"])
    assert after["source_run_id"] == SECOND and after["previous_snapshot"] == before["snapshot_id"]
    assert after["totals"] == before["totals"]
    assert all(shard.get("reused_from") == before["snapshot_id"] for shard in after["shards"])
    for new, old in zip(after["shards"], before["shards"]):
        for role, entry in new["files"].items():
            assert storage.read_bytes(f"indexes/catalog/{after['snapshot_id']}/{entry['path']}") == \
                storage.read_bytes(f"indexes/catalog/{before['snapshot_id']}/{old['files'][role]['path']}")
    # the report of the second night still shows real searches against its own snapshot
    assert second["snapshot"]["snapshot_id"] == after["snapshot_id"]
    assert second["search_samples"] and all(s["results"] for s in second["search_samples"])
    assert json.loads(storage.read_text(f"reports/{SECOND}/report.json"))["timings_s"].keys() == \
        first["timings_s"].keys()
    assert np.isclose(second["snapshot"]["recall_at_10"], first["snapshot"]["recall_at_10"])
