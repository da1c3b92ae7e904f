"""Property: random catalog feeds evolving over several nights, with category backfills, keep the crawl's
invariants (DESIGN.md 1, 5, 7): every manifest row accounted for exactly once, one state row per
(product_id, image_url), every live row's bytes readable, each live row in the category the manifest
gives it (for a backfill: the manifest's, in scope; the previous night's elsewhere).

Feeds add and remove products, move them between categories, change images, and point some rows at a
failing server. Real HTTP crawls, tasks in this process. A second, smaller property runs the whole
pipeline every night (dedup, validation on Spark, embed, index, publish) and checks that every live
product is searchable in its category in the snapshot LATEST names. The normal run tries a few seeded
feeds; CATALOG_INDEX_CHAOS=N tries N times as many.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import make_noise_png, make_png
from pipelines.client import SnapshotClient, pull
from pipelines.config import load_settings
from pipelines.crawl.stage import read_crawl_state, read_current_images, run_crawl
from pipelines.pipeline import RunContext, run_pipeline
from pipelines.readers import quarantined_sha256s, read_dedup_images, read_embeddings
from pipelines.snapshot import read_latest
from pipelines.storage import open_storage

CHAOS = int(os.environ.get("CATALOG_INDEX_CHAOS", "1"))
CATEGORIES = ["food", "tools", "toys"]

night = st.fixed_dictionaries({
    "add": st.integers(0, 3),
    "remove": st.lists(st.integers(0, 30), max_size=2),
    "move": st.lists(st.tuples(st.integers(0, 30), st.integers(1, 2)), min_size=1, max_size=2),
    "change": st.lists(st.integers(0, 30), max_size=2),
    "failing": st.lists(st.integers(0, 30), max_size=2),
    # a nightly, or a backfill of the categories this night's moves went to, came from, or both
    "backfill": st.sampled_from([None, "to", "from", "both"]),
})


def _write(path: Path, rows) -> str:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_id", "category", "image_url", "title"])
        writer.writerows(rows)
    return str(path)


@settings(max_examples=6 * CHAOS, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(nights=st.lists(night, min_size=5, max_size=7))
def test_random_feeds_over_many_nights_keep_every_invariant(fault_server, tmp_path_factory, nights):
    root = tmp_path_factory.mktemp("nights")
    warehouse = (root / "wh").as_uri()
    config = load_settings(warehouse=warehouse, crawl={"allow_private_hosts": True, "retries": 0, "rows_per_task": 3,
                                                       "total_timeout_s": 5})
    storage = open_storage(warehouse)
    catalog = {}   # product -> (category, image name)
    version = {}
    for n in range(6):
        name = f"{root.name}-{n}.png"
        fault_server.put(name, make_png(color=(40 * n, 80, 20), pattern=n))
        catalog[f"p{n}"] = (CATEGORIES[n % 3], name)
    previous: dict[tuple[str, str], str] = {}
    for number, change in enumerate(nights):
        products = sorted(catalog)
        for i in change["remove"]:
            if len(catalog) > 2:
                catalog.pop(products[i % len(products)], None)
        for _ in range(change["add"]):
            n = len(version) + 100 + number * 10 + _
            name = f"{root.name}-{n}.png"
            fault_server.put(name, make_png(color=(n % 250, 20, 90), pattern=n))
            catalog[f"p{n}"] = (CATEGORIES[n % 3], name)
            version[n] = 0
        products = sorted(catalog)
        moved_to, moved_from = set(), set()
        for i, shift in change["move"]:
            product = products[i % len(products)]
            old = catalog[product][0]
            new = CATEGORIES[(CATEGORIES.index(old) + shift) % len(CATEGORIES)]
            catalog[product] = (new, catalog[product][1])
            moved_from.add(old)
            moved_to.add(new)
        scope = {None: None, "to": sorted(moved_to), "from": sorted(moved_from),
                 "both": sorted(moved_to | moved_from)}[change["backfill"]]
        for i in change["change"]:
            _, name = catalog[products[i % len(products)]]
            version[name] = version.get(name, 0) + 1
            fault_server.put(name, make_png(color=(version[name] * 37 % 250, 200, 10), pattern=version[name]))
        failing = {products[i % len(products)] for i in change["failing"]}
        rows = [(p, c, fault_server.url("status/503") if p in failing else fault_server.url(f"img/{name}"), p)
                for p, (c, name) in sorted(catalog.items())]
        run_id = f"2026112{number}T020000Z"
        summary = run_crawl(config, _write(root / f"{run_id}.csv", rows), run_id, runner="local",
                            categories=scope)

        # 1. every manifest row in exactly one place
        assert summary.accounted == summary.manifest_rows == len(rows)
        state = read_crawl_state(storage, run_id)
        keys = list(zip(state["product_id"], state["image_url"]))
        assert len(keys) == len(set(keys)), "two state rows for one (product, image)"
        live = read_current_images(storage, run_id, with_bytes=True)
        # 5. every live row's bytes are readable, and they are the bytes of its sha256
        assert live["image"].notna().all()
        import hashlib
        assert all(hashlib.sha256(data).hexdigest() == sha for data, sha in zip(live["image"], live["sha256"]))
        # scope: a row of a category in this run's scope (by the manifest) has the manifest's category
        categories = {p: c for p, (c, _) in catalog.items()}
        for row in live.itertuples():
            in_scope = scope is None or categories.get(row.product_id) in scope
            if in_scope and row.product_id in categories and row.image_url.endswith(catalog[row.product_id][1]):
                assert row.category == categories[row.product_id]
        previous = {(r.product_id, r.image_url): r.category for r in live.itertuples()}
    assert previous is not None


# -- every live product searchable ------------------------------------------------------------------

small_night = st.fixed_dictionaries({
    "add": st.integers(0, 2),
    "remove": st.lists(st.integers(0, 30), max_size=1),
    "move": st.lists(st.tuples(st.integers(0, 30), st.integers(1, 2)), max_size=1),
    "change": st.lists(st.integers(0, 30), max_size=1),
    "failing": st.lists(st.integers(0, 30), max_size=1),
})


@pytest.mark.spark
@settings(max_examples=2 * CHAOS, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(nights=st.lists(small_night, min_size=3, max_size=3))
def test_after_every_night_every_live_product_is_searchable_in_its_category(fault_server, spark, tmp_path_factory,
                                                                            nights):
    """The whole pipeline each night (`run_pipeline`, tasks in this process, validation on the test's
    Spark session): the snapshot LATEST names, pulled and verified, holds every live (product, image)
    row of the night's crawl in that row's category (the manifest's, unless the row is a stale image
    kept from an earlier night), each product the manifest lists with a live image is found in it by a
    search with its own stored vector in its category, and no product gone from the manifest is left."""
    root = tmp_path_factory.mktemp("searchable")
    warehouse = (root / "wh").as_uri()
    config = load_settings(warehouse=warehouse, crawl={"allow_private_hosts": True, "retries": 0, "rows_per_task": 3,
                                                       "total_timeout_s": 5})
    storage = open_storage(warehouse)
    catalog = {}
    for n in range(5):
        name = f"{root.name}-{n}.png"
        fault_server.put(name, make_noise_png(size=(96, 96), seed=n))
        catalog[f"p{n}"] = (CATEGORIES[n % 3], name)
    for number, change in enumerate(nights):
        products = sorted(catalog)
        for i in change["remove"]:
            if len(catalog) > 3:
                catalog.pop(products[i % len(products)], None)
        for extra in range(change["add"]):
            n = 100 + number * 10 + extra
            name = f"{root.name}-{n}.png"
            fault_server.put(name, make_noise_png(size=(96, 96), seed=n))
            catalog[f"p{n}"] = (CATEGORIES[n % 3], name)
        products = sorted(catalog)
        for i, shift in change["move"]:
            product = products[i % len(products)]
            category, name = catalog[product]
            catalog[product] = (CATEGORIES[(CATEGORIES.index(category) + shift) % 3], name)
        for i in change["change"]:
            _, name = catalog[products[i % len(products)]]
            fault_server.put(name, make_noise_png(size=(96, 96), seed=1000 * (number + 1) + i))
        failing = {products[i % len(products)] for i in change["failing"]}
        rows = [(p, c, fault_server.url("status/503") if p in failing else fault_server.url(f"img/{name}"), p)
                for p, (c, name) in sorted(catalog.items())]
        run_id = f"2026112{number}T020000Z"
        run_pipeline(RunContext(config, run_id, manifest=_write(root / f"{run_id}.csv", rows), force=True,
                                runner="local", spark=spark))

        live = read_current_images(storage, run_id)
        dropped = set()
        for stage in ("images", "embeddings"):
            dropped |= quarantined_sha256s(storage, run_id, stage)
        live = live[~live["sha256"].isin(dropped)]
        client = SnapshotClient(pull(warehouse, root / "serving").path)
        assert client.snapshot_id == read_latest(storage, "catalog")["snapshot_id"]
        indexed = {row for shard in client.snapshot.shards for row in zip(
            shard.columns["product_id"].to_pylist(), shard.columns["category"].to_pylist(),
            shard.columns["image_url"].to_pylist())}
        assert len(indexed) >= 3 and set(zip(live["product_id"], live["category"], live["image_url"])) == indexed, \
            f"night {number}"
        assert {p for p, _, _ in indexed} <= set(catalog), "a product gone from the manifest is still searchable"
        vectors = read_embeddings(storage, client.snapshot.model_version).set_index("sha256")["vector"]
        dedup = read_dedup_images(storage, run_id).set_index(["product_id", "image_url"])["canonical_sha256"]
        for row in live.itertuples():
            if row.product_id in catalog and row.image_url.endswith(catalog[row.product_id][1]):
                assert row.category == catalog[row.product_id][0]
            query = np.asarray(vectors[dedup[(row.product_id, row.image_url)]], dtype=np.float32)[None, :]
            hits = client.search_vectors(query, k=len(live), category=row.category)[0]
            assert row.product_id in {hit.product_id for hit in hits}, f"night {number}: {row.product_id}"
