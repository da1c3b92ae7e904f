"""History the pipeline depends on: image bytes outlive the run that fetched them, lost bytes heal, and a
backfill of a product that changed category keeps one state row per (product, image) (invariants 1, 5, 7).

Real HTTP crawls (the fault server answers 304 to conditional requests), tasks run in this process."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import make_png
from pipelines import layout
from pipelines.config import load_settings
from pipelines.crawl.stage import HistoryRewrite, read_crawl_state, read_current_images, run_crawl
from pipelines.readers import backfill_index_scope
from pipelines.storage import open_storage


def write_manifest(path: Path, rows: list[tuple]) -> str:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_id", "category", "image_url", "title"])
        writer.writerows(rows)
    return str(path)


@pytest.fixture
def night(fault_server, tmp_path):
    images = {f"h{i}.png": make_png(color=(30 * i, 90, 40), pattern=i) for i in range(6)}
    for name, data in images.items():
        fault_server.put(name, data)
    warehouse = (tmp_path / "wh").as_uri()
    settings = load_settings(warehouse=warehouse, crawl={"allow_private_hosts": True, "retries": 0,
                                                         "rows_per_task": 2, "total_timeout_s": 5})
    rows = [(f"p{i}", "food" if i < 3 else "tools", fault_server.url(f"img/h{i}.png"), f"item {i}") for i in range(6)]

    def crawl(run_id: str, manifest_rows, **kwargs):
        name = f"{run_id}-{len(list(tmp_path.glob('*.csv')))}.csv"
        return run_crawl(settings, write_manifest(tmp_path / name, manifest_rows), run_id, runner="local", **kwargs)

    return crawl, rows, open_storage(warehouse), images


def live_bytes(storage, run_id):
    current = read_current_images(storage, run_id, with_bytes=True)
    return {(r.product_id, r.category): r.image for r in current.itertuples()}


def test_rerunning_an_older_night_keeps_the_bytes_later_nights_read(night):
    crawl, rows, storage, images = night
    crawl("20261123T020000Z", rows)
    second = crawl("20261124T020000Z", rows)
    assert second.not_modified == 6                       # every row points at the first night's files
    with pytest.raises(HistoryRewrite, match="catalog_backfill"):
        crawl("20261123T020000Z", rows[:4])
    crawl("20261123T020000Z", rows[:4], rewrite_history=True)   # the explicit rewrite: a fresh attempt
    later = live_bytes(storage, "20261124T020000Z")
    assert len(later) == 6 and all(data is not None for data in later.values())
    assert sorted(later.values()) == sorted(images.values())
    old = live_bytes(storage, "20261123T020000Z")
    assert len(old) == 4 and all(data is not None for data in old.values())


def test_bytes_lost_from_the_warehouse_are_fetched_again_not_revalidated(night):
    crawl, rows, storage, images = night
    crawl("20261123T020000Z", rows)
    [lost] = [k for k in storage.list("images/category=tools/") if k.endswith(".parquet")][:1]
    lost_products = set(storage.read_parquet_file(lost, columns=["product_id"]).column("product_id").to_pylist())
    storage.delete(lost)
    summary = crawl("20261124T020000Z", rows)
    assert summary.refetched_lost_bytes == len(lost_products) and summary.fetched == len(lost_products)
    assert all(data is not None for data in live_bytes(storage, "20261124T020000Z").values())


def _state(storage, run_id):
    state = read_crawl_state(storage, run_id)
    return state[state["status"] != "removed"].set_index(["product_id", "image_url"])["category"].to_dict()


@pytest.mark.parametrize("backfilled", ["tools", "food"])
def test_a_backfill_after_a_category_move_keeps_one_row_per_image_in_its_new_category(night, backfilled):
    """p1 moves from food to tools. Backfilling its new category or its old one: one state row for
    (p1, url), in tools; the index scope holds both categories; the next nightly commits."""
    crawl, rows, storage, _ = night
    crawl("20261123T020000Z", rows)
    moved = [(p, "tools" if p == "p1" else c, u, t) for p, c, u, t in rows]
    summary = crawl("20261124T020000Z", moved, categories=[backfilled])
    state = _state(storage, "20261124T020000Z")
    assert len(state) == 6 and state[("p1", rows[1][2])] == "tools"
    assert summary.moved == 1 and summary.index_scope == ["food", "tools"]
    assert backfill_index_scope(storage, "20261124T020000Z", [backfilled]) == ["food", "tools"]
    assert {p for (p, _), c in state.items() if c == "tools"} == {"p1", "p3", "p4", "p5"}
    assert all(data is not None for data in live_bytes(storage, "20261124T020000Z").values())
    nightly = crawl("20261125T020000Z", moved)
    assert nightly.accounted == nightly.manifest_rows == 6
    assert _state(storage, "20261125T020000Z") == state


def test_a_killed_crawl_resumes_under_the_same_attempt_and_a_changed_manifest_starts_a_new_one(night):
    crawl, rows, storage, _ = night
    crawl("20261123T020000Z", rows)
    plan = storage.read_text(f"{layout.crawl_prefix('20261123T020000Z')}plan.json")
    storage.delete(layout.crawl_success_key("20261123T020000Z"))     # killed before the commit marker
    resumed = crawl("20261123T020000Z", rows)
    assert resumed.tasks_resumed == resumed.tasks
    assert storage.read_text(f"{layout.crawl_prefix('20261123T020000Z')}plan.json") == plan
    files = set(storage.list("images/"))
    crawl("20261123T020000Z", rows[:5])
    assert set(storage.list("images/")).isdisjoint(files)   # nothing referenced them: replaced, under new names
