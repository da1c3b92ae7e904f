"""Validate stage: GX suites on real local Spark, quarantine accounting, gates, Data Docs, CLI.

Two crawled nights of a small catalog served by the fault server: night 1 is good (one
banner-shaped image to quarantine), night 2 is bad (404s, HTML served as images, a category
that lost most of its images, a new category). Embeddings and index stats are crafted.
"""
from __future__ import annotations

import argparse
import csv
import json
import math

import pyarrow as pa
import pytest

from conftest import make_png
from fault_server import FaultServer
from pipelines import layout
from pipelines.config import load_settings
from pipelines.crawl.stage import run_crawl
from pipelines.validate.gates import (GateFailed, ValidateSettings, category_drop_gate, crawl_failure_gate,
                             decode_failure_gate, rate_gate)
from pipelines.storage import open_storage
from pipelines.layout import dedup_images_key, embed_success_key
from pipelines.layout import validation_quarantine_key as quarantine_key
from pipelines.layout import validation_report_key as report_key
from pipelines.validate.embeddings import validate_embeddings
from pipelines.validate.index import validate_index
from pipelines.validate.stage import validate_stage
from pipelines.validate.suites import expectation_name
from pipelines.validate.tables import exclude_quarantined, read_spark_table
from schemas.tables import DEDUP_IMAGES, EMBEDDINGS, MANIFEST, QUARANTINE

NIGHT1, NIGHT2, BROKEN = "20261101T030000Z", "20261102T030000Z", "20261103T030000Z"
pytestmark = pytest.mark.spark

THRESHOLDS = ValidateSettings(max_crawl_failure_rate=0.2, category_drop_min_previous=1, min_bytes=10,
                              max_quarantine_rate={"manifest": 0.2, "images": 0.2, "embeddings": 0.0},
                              embedding_dim=8, reuse_unchanged=False)   # these tests validate the same runs again


# ---------------------------------------------------------------------------------------
# gates as plain functions (no Spark)
# ---------------------------------------------------------------------------------------

def test_rate_gate_numbers_and_empty_denominator():
    gate = rate_gate("x", 3, 20, 0.1, "validation.x", "of rows failed")
    assert not gate.passed and gate.observed == 0.15
    assert "15.0% of rows failed (3 of 20), above the limit of 10.0% (validation.x)" == gate.message
    assert rate_gate("x", 0, 0, 0.0, "validation.x", "failed").passed


def test_crawl_and_decode_gates_read_the_crawl_summary():
    summary = {"manifest_rows": 110, "out_of_scope": 10, "fetched": 90, "quarantined": 12,
               "quarantine_reasons": {"http_404": 8, "not_an_image": 3, "truncated": 1}}
    crawl = crawl_failure_gate(summary, ValidateSettings(max_crawl_failure_rate=0.1))
    assert not crawl.passed and crawl.details["total"] == 100 and crawl.observed == 0.12
    decode = decode_failure_gate(summary, ValidateSettings(max_decode_failure_rate=0.05))
    assert decode.passed and decode.details == {"failed": 4, "total": 94, "reasons": {"not_an_image": 3, "truncated": 1}}


def test_category_drop_ignores_small_categories_and_counts_vanished_ones():
    settings = ValidateSettings(max_category_drop=0.5, category_drop_min_previous=10)
    gate = category_drop_gate({"food": 100, "toys": 1}, {"food": 120, "toys": 5, "tools": 40}, "r0", settings)
    assert not gate.passed and set(gate.observed) == {"tools"}       # toys is below the minimum size
    assert gate.observed["tools"] == {"previous": 40, "current": 0, "drop": 1.0}
    assert "tools 40 -> 0 (-100.0%)" in gate.message
    assert category_drop_gate({"food": 70}, {"food": 120}, "r0", settings).passed  # -41.7% is allowed
    assert category_drop_gate({"food": 1}, None, None, settings).passed           # first run


def test_suite_files_load_and_bad_ones_say_what_is_wrong(tmp_path):
    from pipelines.validate.suites import SuiteError, load_suite

    for name in ("manifest", "images", "embeddings", "index"):
        suite = load_suite(name)
        assert suite["name"] == name and suite["meta"]["row_key"]
    (tmp_path / "broken.json").write_text(json.dumps({"name": "broken", "expectations": [
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "a"}},
        {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "a"}}]}))
    with pytest.raises(SuiteError, match="broken.json: expectations must be unique.*not_be_null:a"):
        load_suite("broken", tmp_path)
    (tmp_path / "unknown.json").write_text(json.dumps({"name": "unknown", "expectations": [
        {"type": "expect_column_values_to_be_purple", "kwargs": {"column": "a"}}]}))
    with pytest.raises(SuiteError, match="unknown.json: Great Expectations cannot build expect_column_values_to_be_purple:a"):
        load_suite("unknown", tmp_path)


# ---------------------------------------------------------------------------------------
# two crawled nights
# ---------------------------------------------------------------------------------------

def _manifest(path, rows) -> str:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_id", "category", "image_url", "title"])
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def nights(spark, tmp_path_factory):
    """Warehouse with night 1 (good) crawled and validated, and night 2 (bad) crawled."""
    work = tmp_path_factory.mktemp("validate")
    server = FaultServer().start()
    try:
        for i in range(12):
            server.put(f"g{i}.png", make_png(color=(20 * i, 90, 40), pattern=i))
        server.put("banner.png", make_png(size=(400, 20), pattern=3))
        server.put("leaf.png", make_png(color=(10, 200, 10), pattern=5))
        u = server.url
        food = [(f"f{i}", "food", u(f"img/g{i}.png"), "") for i in range(6)]
        tools = [(f"t{i}", "tools", u(f"img/g{i + 6}.png"), "") for i in range(6)]
        night1 = food + tools + [("t9", "tools", u("img/banner.png"), "banner")]
        night2 = food + tools[:1] + [
            ("l1", "garden", u("img/leaf.png"), "a new category"),
            ("f0", "food", u("img/g0.png"), "repeated row"),
            ("", "food", u("img/g1.png"), "no product id"),
            *[(f"x{i}", "food", u("status/404"), "") for i in range(4)],
            ("h1", "food", u("html-as-jpeg"), ""), ("h2", "food", u("empty"), "")]
        settings = load_settings(warehouse=(work / "wh").as_uri(), crawl={
            "allow_private_hosts": True, "retries": 0, "rows_per_task": 8, "read_timeout_s": 2, "total_timeout_s": 4})
        first = run_crawl(settings, _manifest(work / "n1.csv", night1), NIGHT1, spark=spark)
        night1_images = validate_stage(settings, NIGHT1, "images", spark=spark, validation=THRESHOLDS)
        second = run_crawl(settings, _manifest(work / "n2.csv", night2), NIGHT2, spark=spark)
    finally:
        server.stop()
    return settings, first, second, night1_images


def test_good_night_passes_every_gate_and_quarantines_only_the_banner(nights, spark):
    settings, first, _, result = nights
    assert first.quarantined == 0 and result.outcome == "passed"
    assert {g.name: g.passed for g in result.gates} == {
        "crawl_failure_rate": True, "decode_failure_rate": True, "category_drop": True, "images_checks": True,
        "quarantine_rate": True}
    a = result.accounting
    assert (a["input_rows"], a["passed_rows"], a["quarantined_rows"]) == (13, 12, 1)
    assert a["quarantine_reasons"] == {"expect_column_values_to_be_between:height": 1}

    storage = open_storage(settings.warehouse)
    quarantine = storage.read_table(quarantine_key(NIGHT1, "images"))
    assert quarantine.schema.equals(QUARANTINE, check_metadata=False)
    row = quarantine.to_pylist()[0]
    assert (row["product_id"], row["stage"], row["run_id"]) == ("t9", "validate", NIGHT1)
    assert "height=20 (expected >= 32)" in row["detail"] and "aspect_ratio=20.0" in row["detail"]

    # The Spark filters derived from the suite find exactly the rows GX counts as unexpected.
    for entry in result.expectations:
        if "rows_failing_in_spark" in entry:
            assert entry["rows_failing_in_spark"] == entry["result"]["unexpected_count"], entry["expectation"]

    # Downstream stages drop the quarantined keys: input = passed + quarantined.
    state = read_spark_table(spark, storage, layout.crawl_state_prefix(NIGHT1))
    kept = exclude_quarantined(state, storage, NIGHT1, "images", spark)
    assert kept.count() == a["passed_rows"] and "t9" not in {r.product_id for r in kept.collect()}

    report = json.loads(storage.read_text(report_key(NIGHT1, "images")))
    assert report["outcome"] == "passed" and len(report["expectations"]) == 10
    assert report["extra"]["valid_images_per_category"] == {"food": 6, "tools": 6}
    docs = storage.root / layout.reports_prefix(NIGHT1) / "gx" / "images"
    assert (docs / "index.html").is_file()
    (page,) = (docs / "validations").rglob("*.html")
    assert "aspect_ratio" in page.read_text()


def test_bad_night_trips_crawl_decode_and_category_gates(nights, spark):
    settings, _, second, _ = nights
    with pytest.raises(GateFailed) as caught:
        validate_stage(settings, NIGHT2, "images", spark=spark, validation=THRESHOLDS)
    error = caught.value
    assert {g.name for g in error.tripped} == {"crawl_failure_rate", "decode_failure_rate", "category_drop"}
    message = str(error)
    assert f"50.0% of manifest rows were quarantined by the crawl (8 of 16)" in message
    assert "did not decode as images (2 of" in message and "tools 6 -> 1 (-83.3%)" in message
    assert f"--run-id {NIGHT2} --stage images --force" in message

    storage = open_storage(settings.warehouse)
    report = json.loads(storage.read_text(report_key(NIGHT2, "images")))
    assert report["outcome"] == "stopped" and set(report["tripped"]) == {g.name for g in error.tripped}
    drop = next(g for g in report["gates"] if g["name"] == "category_drop")
    assert drop["observed"]["tools"]["previous"] == 6 and drop["details"]["previous_run"] == NIGHT1


def test_manifest_quarantines_bad_rows_and_flags_new_categories(nights, spark):
    settings, _, second, _ = nights
    result = validate_stage(settings, NIGHT2, "manifest", spark=spark, validation=THRESHOLDS)
    assert result.outcome == "passed" and result.previous_successful_run == NIGHT1
    a = result.accounting
    assert a["input_rows"] == second.manifest_rows == a["passed_rows"] + a["quarantined_rows"]
    assert a["quarantine_reasons"] == {"expect_column_values_to_not_be_null:product_id": 1,
                                       "expect_compound_columns_to_be_unique:product_id+image_url": 1}
    assert result.extra["also_quarantined_by_crawl"] == 2
    # New category: flagged, not rejected.
    assert result.extra["new_categories"] == {"garden": 1}
    assert any("garden (1 rows)" in w for w in result.warnings)
    storage = open_storage(settings.warehouse)
    rejected = storage.read_table(quarantine_key(NIGHT2, "manifest")).to_pylist()
    assert "garden" not in {r["category"] for r in rejected}
    duplicate = next(r for r in rejected if r["reason"].startswith("expect_compound"))
    assert duplicate["product_id"] == "f0" and duplicate["row_index"] == 8   # the repeat, not the first copy


def test_manifest_without_a_required_column_stops_the_run(nights, spark):
    settings, *_ = nights
    storage = open_storage(settings.warehouse)
    crafted = pa.table({"row_index": pa.array([0, 1], pa.int64()), "product_id": ["a", "b"], "category": ["food"] * 2})
    storage.write_table(layout.manifest_key(BROKEN), crafted)
    with pytest.raises(GateFailed) as caught:
        validate_stage(settings, BROKEN, "manifest", spark=spark, validation=THRESHOLDS)
    (gate,) = caught.value.tripped
    assert gate.name == "manifest_checks" and "expect_table_columns_to_match_set" in gate.message
    assert "image_url" in json.dumps(gate.details)


def _validate_cli(argv: list[str]) -> int:
    from pipelines.cli.validate import add_validate_commands as _add_validate

    parser = argparse.ArgumentParser(prog="catalog-index")
    _add_validate(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["validate", *argv])
    return args.func(args)


def test_cli_force_lets_a_stopped_run_go_on_and_records_it(nights, capsys):
    settings, *_ = nights
    code = _validate_cli(["--warehouse", settings.warehouse, "--run-id", NIGHT2, "--stage", "images", "--force"])
    assert code == 0
    report = json.loads(open_storage(settings.warehouse).read_text(report_key(NIGHT2, "images")))
    assert report["outcome"] == "forced" and report["forced"] is True
    # Default thresholds here (the CLI reads settings, not THRESHOLDS): tools is too small for category_drop.
    assert {"crawl_failure_rate", "decode_failure_rate"} <= set(report["tripped"])
    assert "forced" in capsys.readouterr().err


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        _validate_cli(["--help"])
    out = capsys.readouterr().out
    for flag in ("--warehouse", "--run-id", "--stage", "--force", "--model-version", "--index-stats",
                 "--expected-vectors", "--config", "max_crawl_failure_rate", "exit codes"):
        assert flag in out


# ---------------------------------------------------------------------------------------
# embeddings and index (crafted: those stages are not built yet)
# ---------------------------------------------------------------------------------------

def _unit(values):
    norm = math.sqrt(sum(v * v for v in values))
    return [v / norm for v in values]


def _embeddings(spark, rows):
    return spark.createDataFrame(rows, "sha256 string, model_version string, vector array<float>")


def test_embeddings_and_index_find_their_inputs_in_the_warehouse_and_pass(spark, tmp_path):
    """As the pipeline calls them: no inputs given, everything read from the stages' outputs."""
    settings = load_settings(warehouse=(tmp_path / "wh").as_uri())
    storage = open_storage(settings.warehouse)
    # p4 (toys) is a near duplicate of s0 (food): one vector for the cluster.
    # s3 could not be decoded by the embed stage: quarantined there, so not expected.
    members = [("p0", "food", "s0", "s0"), ("p1", "food", "s1", "s1"), ("p2", "tools", "s2", "s2"),
               ("p3", "tools", "s3", "s3"), ("p4", "toys", "s4", "s0")]
    storage.write_table(dedup_images_key("r1"), pa.Table.from_pylist([
        {"product_id": p, "category": c, "image_url": f"http://x/{p}.png", "sha256": sha, "cluster_id": canonical,
         "canonical_sha256": canonical, "is_canonical": sha == canonical,
         "duplicate_kind": "none" if sha == canonical else "near"} for p, c, sha, canonical in members],
        schema=DEDUP_IMAGES))
    storage.write_table(f"{layout.quarantine_prefix('r1', 'embed')}part-0.parquet", pa.Table.from_pylist(
        [{"run_id": "r1", "stage": "embed", "reason": "corrupt", "sha256": "s3"}], schema=QUARANTINE))
    storage.write_text(embed_success_key("r1"), json.dumps({"model_version": "m1"}))
    storage.write_table("embeddings/m1/part-r1-0.parquet", pa.Table.from_pylist(
        [{"sha256": sha, "vector": _unit([i + 1.0] + [0.5] * 7), "model_version": "m1", "run_id": "r0"}
         for i, sha in enumerate(["s0", "s1", "s2", "cached-for-another-run"])], schema=EMBEDDINGS))
    # A shard stores an image once, whatever categories of the shard sell it: food+toys hold s0, s1.
    storage.write_text("indexes/main/snap1/_build.json", json.dumps({"source_run_id": "r1", "created_at": "t", "shards": [
        {"shard_id": "shard-0000", "categories": ["food", "toys"], "vectors": 2, "recall_at_10": 0.99},
        {"shard_id": "shard-0001", "categories": ["tools"], "vectors": 1, "recall_at_10": 1.0}]}))

    embeddings = validate_stage(settings, "r1", "embeddings", spark=spark, validation=THRESHOLDS)
    assert embeddings.outcome == "passed" and embeddings.accounting["quarantined_rows"] == 0
    assert embeddings.parameters["canonical_images"] == 3 and embeddings.extra["model_version"] == "m1"
    index = validate_stage(settings, "r1", "index", spark=spark, validation=THRESHOLDS)
    assert index.outcome == "passed" and index.parameters["expected_vectors"] == 3
    assert index.extra["build"] == "indexes/main/snap1/_build.json"


def test_bad_embeddings_are_quarantined_and_stop_the_run(spark, tmp_path):
    settings = load_settings(warehouse=(tmp_path / "wh").as_uri())
    canonical = spark.createDataFrame([(f"s{i}",) for i in range(6)], "sha256 string")
    good = _unit([1.0] * 8)
    vectors = _embeddings(spark, [
        ("s0", "m1", good),
        ("s1", "m1", good[:7] + [float("nan")]),          # not finite
        ("s2", "m1", _unit([1.0] * 7)),                   # wrong dimension
        ("s3", "m1", [2 * v for v in good]),              # norm 2
        ("s4", "m1", good), ("s4", "m1", good),           # two vectors for one image
    ])                                                    # s5: no vector at all
    with pytest.raises(GateFailed) as caught:
        validate_embeddings(settings, "r1", spark=spark, embeddings=vectors, canonical=canonical,
                            model_version="m1", validation=THRESHOLDS)
    result = caught.value.results
    assert {g.name for g in result.tripped} == {"embeddings_checks", "quarantine_rate"}
    a = result.accounting
    assert (a["input_rows"], a["passed_rows"], a["quarantined_rows"]) == (7, 1, 6)
    assert a["quarantine_reasons"] == {
        "expect_column_values_to_be_in_set:all_finite": 1, "expect_column_values_to_be_between:dim": 1,
        "expect_column_values_to_be_between:norm": 1, "expect_column_values_to_be_unique:sha256": 2,
        "expect_column_values_to_not_be_null:vector": 1}
    storage = open_storage(settings.warehouse)
    rejected = {r["sha256"] for r in storage.read_table(quarantine_key("r1", "embeddings")).to_pylist()}
    assert rejected == {"s1", "s2", "s3", "s4", "s5"}


@pytest.mark.s3
def test_index_stats_gate_on_s3_with_docs_uploaded(spark, s3_bucket):
    bucket, s3 = s3_bucket
    settings = load_settings(warehouse=f"s3://{bucket}/wh", s3=s3.model_dump())
    stats = [{"shard": "0", "vector_count": 60, "recall_at_10": 0.97},
             {"shard": "1", "vector_count": 40, "recall_at_10": 0.95}]
    result = validate_index(settings, "r1", spark=spark, shard_stats=stats, expected_vectors=100,
                            validation=THRESHOLDS)
    assert result.outcome == "passed"
    storage = open_storage(settings.warehouse, settings.s3)
    assert storage.exists(f"{layout.reports_prefix('r1')}gx/index/index.html")
    assert json.loads(storage.read_text(report_key("r1", "index")))["outcome"] == "passed"

    # Warehouse tables on S3 reach Spark through Arrow when the fallback is allowed.
    storage.write_table("runs/r1/manifest.parquet", pa.table(
        {"row_index": pa.array([0, 1], pa.int64()), "product_id": ["a", "b"], "category": ["c", "c"],
         "image_url": ["http://x/1", "http://x/2"], "title": [None, None]}, schema=MANIFEST))
    assert read_spark_table(spark, storage, "runs/r1/manifest.parquet", allow_arrow_fallback=True).count() == 2


def test_cli_index_below_recall_exits_1_with_the_numbers(spark, tmp_path, capsys):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"shards": [{"shard_id": "0", "vectors": 60, "recall_at_10": 0.97},  # _build.json keys
                                            {"shard_id": "1", "vectors": 30, "recall_at_10": 0.41}]}))
    code = _validate_cli(["--warehouse", (tmp_path / "wh").as_uri(), "--run-id", "r1", "--stage", "index",
                          "--index-stats", str(stats), "--expected-vectors", "100"])
    assert code == 1
    out = capsys.readouterr().err
    assert "index_checks" in out and "expect_column_sum_to_be_between:vector_count observed 90" in out
    assert "recall_at_10" in out and "--force" in out


# ---------------------------------------------------------------------------------------
# the fast path: one query for the failing rows agrees with GX, and validation stays cheap
# ---------------------------------------------------------------------------------------

IMAGE_PARAMETERS = {"min_width": 32, "min_height": 32, "min_aspect_ratio": 0.1, "max_aspect_ratio": 10.0,
                    "allowed_formats": ["JPEG", "PNG"], "min_bytes": 100, "max_bytes": 10_000}


def _crafted_images(spark):
    """Good rows, and rows breaking each row-level expectation of the images suite (some several)."""
    good = ("s", "PNG", 1_000, 64, 48)
    rows = [good] * 5 + [
        (None, "PNG", 1_000, 64, 48),            # no sha256
        ("s", None, 1_000, 64, 48),              # no format
        ("s", "PNG", 1_000, None, 48),           # no width (aspect ratio null too)
        ("s", "PNG", 1_000, 64, None),           # no height
        ("s", "PNG", 1_000, 8, 48),              # too narrow
        ("s", "PNG", 1_000, 64, 4),              # too low and aspect ratio 16
        ("s", "SVG", 1_000, 64, 48),             # format not allowed
        ("s", "PNG", 20, 64, 48),                # too small a file
        ("s", "GIF", 50_000, 4, 400),            # four failures: format, bytes, width, aspect ratio
    ]
    return spark.createDataFrame(
        [(f"p{i}", "food", f"http://x/{i}.png", sha, size, fmt, w, h, (w / h) if w and h else None, 200)
         for i, (sha, fmt, size, w, h) in enumerate(rows)],
        "product_id string, category string, image_url string, sha256 string, byte_size long, format string, "
        "width int, height int, aspect_ratio double, http_status int")


def _crafted_manifest(spark):
    rows = [(0, "a", "food", "http://x/a.png"), (1, "b", "food", "http://x/b.png"),
            (2, "a", "food", "http://x/a.png"),      # repeats row 0
            (3, "a", "food", "http://x/a.png"),      # and again
            (4, None, "food", "http://x/c.png"),     # no product id
            (5, "d", None, "http://x/d.png"),        # no category
            (6, "e", "food", "ftp://x/e.png"),       # not a URL the crawl fetches
            (7, "f", "food", "http://x/has space"),  # whitespace in the URL
            (8, "g", "tools", None)]                 # no URL
    return spark.createDataFrame(rows, "row_index long, product_id string, category string, image_url string")


@pytest.mark.parametrize("stage", ["images", "manifest"])
def test_the_failing_rows_query_finds_exactly_what_gx_counts(spark, stage):
    """Quarantine comes from one Spark query over the suite's row-level expectations; GX runs
    the suite itself. On rows crafted to break every row-level expectation, both must agree,
    expectation by expectation (a quarantine that drifted from the suite would go unnoticed)."""
    from pipelines.validate.engine import _CARRIED
    from pipelines.validate.failing_rows import find_failing_rows, is_row_level
    from pipelines.validate.suites import CRITICAL, load_suite, row_checks, run_suite, severity_of

    suite = load_suite(stage)
    df, parameters = ((_crafted_images(spark), IMAGE_PARAMETERS) if stage == "images"
                      else (_crafted_manifest(spark), {"known_categories": ["food"]}))
    outcomes = {o.name: o for o in run_suite(df, suite, parameters, run_name="crafted", docs_dir=None)}
    failing = find_failing_rows(df, row_checks(suite, parameters, df.columns), _CARRIED)

    row_level = [e for e in suite["expectations"] if is_row_level(e) and severity_of(e) == CRITICAL]
    assert set(failing.failures_per_expectation) == {expectation_name(e) for e in row_level}
    for config in row_level:
        name = expectation_name(config)
        gx_count, found = outcomes[name].result["unexpected_count"], failing.failures_per_expectation[name]
        assert found > 0, f"{name}: the crafted rows should break it"
        if (config.get("meta") or {}).get("keep_first_by"):
            assert (gx_count, found) == (3, 2), name     # GX counts every copy; the first copy is kept
        else:
            assert found == gx_count, name
        assert "partial_unexpected_list" not in outcomes[name].result   # no sample asked for: none queried
    if stage == "images":
        assert failing.quarantined == 9 and failing.input_rows == 14
        worst = next(r for r in failing.rows.to_pylist() if r["product_id"] == "p13")
        assert worst["failed"] == ["expect_column_values_to_be_between:width",
                                   "expect_column_values_to_be_between:aspect_ratio",
                                   "expect_column_values_to_be_in_set:format",
                                   "expect_column_values_to_be_between:byte_size"]
        assert worst["reason"] == worst["failed"][0]
        assert "width=4 (expected >= 32)" in worst["detail"] and "aspect_ratio=0.01 (expected between 0.1" in worst["detail"]
        assert "format=GIF (expected one of {JPEG, PNG})" in worst["detail"]
        no_width = next(r for r in failing.rows.to_pylist() if r["product_id"] == "p7")
        assert no_width["detail"] == "expect_column_values_to_not_be_null:width: width=null (expected a value, found null)"
    else:
        assert sorted(r["row_index"] for r in failing.rows.to_pylist()) == [2, 3, 4, 5, 6, 7, 8]


def test_a_validation_runs_a_few_spark_jobs_not_one_per_expectation(nights, spark):
    """Images (10 expectations): GX bundles its counts (one job for the row count, one for every
    other count) and one job finds the failing rows; nothing is re-read per expectation."""
    settings, *_ = nights
    sc = spark.sparkContext
    sc.setJobGroup("validate-images-jobs", "job count of one validation")
    try:
        result = validate_stage(settings, NIGHT1, "images", spark=spark, validation=THRESHOLDS)
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert result.accounting["quarantined_rows"] == 1
    assert len(sc.statusTracker().getJobIdsForGroup("validate-images-jobs")) <= 3
    assert set(result.timings_s) == {"expectations", "data_docs", "failing_rows"}


def test_no_failing_rows_query_when_gx_found_none(nights, spark, monkeypatch):
    import pipelines.validate.engine as validate_module
    settings, *_ = nights

    def must_not_run(*args, **kwargs):
        raise AssertionError("GX counted no failing row: there is nothing to look for")

    monkeypatch.setattr(validate_module, "find_failing_rows", must_not_run)
    result = validate_stage(settings, NIGHT1, "manifest", spark=spark, validation=THRESHOLDS)
    assert result.outcome == "passed" and result.accounting["quarantined_rows"] == 0
    assert result.accounting["input_rows"] == 13
    storage = open_storage(settings.warehouse)
    assert storage.read_table(quarantine_key(NIGHT1, "manifest")).num_rows == 0


def test_validation_gives_the_session_its_sql_settings_back(spark, tmp_path):
    conf = spark.conf
    before = {k: conf.get(k) for k in ("spark.sql.adaptive.enabled", "spark.sql.shuffle.partitions")}
    conf.set("spark.sql.adaptive.enabled", "true")
    conf.set("spark.sql.shuffle.partitions", "7")
    try:
        settings = load_settings(warehouse=(tmp_path / "wh").as_uri())
        stats = [{"shard": "0", "vector_count": 10, "recall_at_10": 0.2}]
        with pytest.raises(GateFailed):   # a stopped validation too
            validate_index(settings, "r1", spark=spark, shard_stats=stats, expected_vectors=10, validation=THRESHOLDS)
        assert (conf.get("spark.sql.adaptive.enabled"), conf.get("spark.sql.shuffle.partitions")) == ("true", "7")
    finally:
        for key, value in before.items():
            conf.set(key, value)


def test_tables_are_read_with_the_schema_spark_would_infer(nights, spark, tmp_path):
    """Reading a local table's schema from its Parquet footer (no Spark job) must give what
    Spark's own inference gives; types that do not map one to one are left to Spark."""
    import pyarrow.parquet as pq

    from pipelines.validate.tables import _parquet_keys, _spark_schema_from_footer

    settings, *_ = nights
    storage = open_storage(settings.warehouse)
    extra = open_storage((tmp_path / "wh").as_uri())
    extra.write_table("embeddings/m1/part-0.parquet", pa.Table.from_pylist(
        [{"sha256": "s0", "vector": [0.5, 0.5], "model_version": "m1", "run_id": "r0"}], schema=EMBEDDINGS))
    for store, key in ((storage, layout.manifest_key(NIGHT1)), (storage, layout.crawl_state_prefix(NIGHT1)),
                       (extra, "embeddings/m1/")):
        paths = [str(store.root / k) for k in _parquet_keys(store, key)]
        assert _spark_schema_from_footer(paths[0]) is not None, key
        assert read_spark_table(spark, store, key).schema == spark.read.parquet(*paths).schema, key
    naive = tmp_path / "naive.parquet"
    pq.write_table(pa.table({"t": pa.array([0], pa.timestamp("us"))}), naive)
    assert _spark_schema_from_footer(str(naive)) is None


# ---------------------------------------------------------------------------------------
# unchanged inputs: an earlier validation is reused, the gates still run
# ---------------------------------------------------------------------------------------

NIGHT1_AGAIN = "20261101T150000Z"   # after night 1, before night 2: its previous successful run is night 1
REUSE = THRESHOLDS.model_copy(update={"reuse_unchanged": True})


@pytest.fixture
def night1_again(nights):
    """A night whose crawl found exactly night 1's catalog (its run files copied); removed afterwards."""
    settings, *_ = nights
    storage = open_storage(settings.warehouse)
    for key in storage.list(f"runs/{NIGHT1}/"):
        storage.write_bytes(f"runs/{NIGHT1_AGAIN}/{key[len(f'runs/{NIGHT1}/'):]}", storage.read_bytes(key))
    yield settings, storage
    for prefix in (f"runs/{NIGHT1_AGAIN}/", f"reports/{NIGHT1_AGAIN}/", f"quarantine/{NIGHT1_AGAIN}/"):
        storage.delete_prefix(prefix)


def _counting_suite_runs(monkeypatch) -> list:
    import pipelines.validate.engine as validate_module
    calls, real = [], validate_module.run_suite
    monkeypatch.setattr(validate_module, "run_suite", lambda *a, **k: calls.append(k.get("asset_name")) or real(*a, **k))
    return calls


def test_unchanged_inputs_reuse_the_earlier_validation_and_the_gates_still_run(night1_again, spark, monkeypatch):
    settings, storage = night1_again
    night1 = {stage: validate_stage(settings, NIGHT1, stage, spark=spark, validation=THRESHOLDS)
              for stage in ("manifest", "images")}
    # As a night of conditional requests would record it: every image 304 Not Modified.
    for key in [k for k in storage.list(layout.crawl_state_prefix(NIGHT1_AGAIN)) if k.endswith(".parquet")]:
        state = storage.read_table(key)
        at = state.schema.get_field_index("http_status")
        storage.write_table(key, state.set_column(at, "http_status", pa.array(
            [304 if s is not None else None for s in state.column("http_status").to_pylist()], state.schema.field(at).type)))
    calls = _counting_suite_runs(monkeypatch)
    again = {stage: validate_stage(settings, NIGHT1_AGAIN, stage, spark=spark, validation=REUSE)
             for stage in ("manifest", "images")}
    assert calls == []                                   # Great Expectations did not run again
    for stage, result in again.items():
        assert result.extra["reused_validation_of"] == NIGHT1, stage
        assert result.extra["memo_key"] == night1[stage].extra["memo_key"]
        assert result.outcome == "passed", stage
        assert result.accounting == night1[stage].accounting, (stage, result.accounting, night1[stage].accounting)
        assert [(e["expectation"], e["success"]) for e in result.expectations] == \
            [(e["expectation"], e["success"]) for e in night1[stage].expectations]
        docs = storage.root / layout.reports_prefix(NIGHT1_AGAIN) / "gx" / stage / "index.html"
        assert docs.is_file(), stage                     # the Data Docs are in this night's reports too
    # The gates are this night's own: they read its crawl summary and compare with its previous run.
    images = again["images"]
    assert {g.name for g in images.gates} == {"crawl_failure_rate", "decode_failure_rate", "category_drop",
                                              "images_checks", "quarantine_rate"}
    assert next(g for g in images.gates if g.name == "category_drop").details.get("previous_run") == NIGHT1
    # The quarantine is this night's: the banner again, under this run id.
    [row] = storage.read_table(quarantine_key(NIGHT1_AGAIN, "images")).to_pylist()
    assert (row["product_id"], row["run_id"], row["http_status"]) == ("t9", NIGHT1_AGAIN, 304)
    assert row["reason"] == "expect_column_values_to_be_between:height" and "height=20" in row["detail"]
    report = json.loads(storage.read_text(report_key(NIGHT1_AGAIN, "images")))
    assert report["extra"]["reused_validation_of"] == NIGHT1 and report["run_id"] == NIGHT1_AGAIN


def test_a_changed_row_or_setting_is_validated_again(night1_again, spark, monkeypatch):
    settings, storage = night1_again
    validate_stage(settings, NIGHT1, "images", spark=spark, validation=THRESHOLDS)
    calls = _counting_suite_runs(monkeypatch)
    stricter = REUSE.model_copy(update={"min_width": 64})
    assert validate_stage(settings, NIGHT1_AGAIN, "images", spark=spark, validation=stricter
                          ).extra.get("reused_validation_of") is None
    assert calls == ["images"]

    # One image of the night is now 8 px wide: the fingerprint changes, GX runs, and quarantines it.
    prefix = layout.crawl_state_prefix(NIGHT1_AGAIN)
    [key] = [k for k in storage.list(prefix) if k.endswith(".parquet") and "t1" in
             storage.read_table(k, columns=["product_id"]).column("product_id").to_pylist()]
    state = storage.read_table(key)
    widths = [8 if p == "t1" else w for p, w in zip(state.column("product_id").to_pylist(),
                                                  state.column("width").to_pylist())]
    storage.write_table(key, state.set_column(state.schema.get_field_index("width"), "width",
                                              pa.array(widths, state.schema.field("width").type)))
    result = validate_stage(settings, NIGHT1_AGAIN, "images", spark=spark, validation=REUSE)
    assert calls == ["images", "images"] and result.extra.get("reused_validation_of") is None
    assert result.accounting["quarantined_rows"] == 2
    assert sorted(r["product_id"] for r in storage.read_table(quarantine_key(NIGHT1_AGAIN, "images")).to_pylist()) \
        == ["t1", "t9"]


def test_stages_validated_side_by_side_all_report_then_the_stop_is_raised(nights, spark):
    """The pipeline validates manifest and images at the same time: a gate that trips in one does
    not keep the other from being validated and reported, and the session's settings come back."""
    from pipelines.validate.stage import validate_stages

    settings, *_ = nights
    storage = open_storage(settings.warehouse)
    for stage in ("manifest", "images"):
        storage.delete(report_key(NIGHT2, stage)) if storage.exists(report_key(NIGHT2, stage)) else None
    conf = spark.conf
    before = (conf.get("spark.sql.adaptive.enabled"), conf.get("spark.sql.shuffle.partitions"))
    with pytest.raises(GateFailed) as caught:
        validate_stages(settings, NIGHT2, ["manifest", "images"], spark=spark, validation=THRESHOLDS)
    assert caught.value.stage == "images" and caught.value.run_id == NIGHT2
    outcomes = {stage: json.loads(storage.read_text(report_key(NIGHT2, stage)))["outcome"]
                for stage in ("manifest", "images")}
    assert outcomes == {"manifest": "passed", "images": "stopped"}
    assert (conf.get("spark.sql.adaptive.enabled"), conf.get("spark.sql.shuffle.partitions")) == before
    results = validate_stages(settings, NIGHT2, ["manifest", "images"], spark=spark, validation=THRESHOLDS, force=True)
    assert [(s, r.outcome) for s, r in results.items()] == [("manifest", "passed"), ("images", "forced")]


def test_suite_parameters_resolved_from_many_threads_keep_their_own_values():
    """GX resolves `$PARAMETER`s with one module-level parser; the manifest and images suites are
    validated side by side, so `_import_gx` makes that one thread at a time (tests/test_kill_resume.py
    saw "push_first() missing 1 required positional argument" from a run's validate stage)."""
    from concurrent.futures import ThreadPoolExecutor

    from great_expectations.core import suite_parameters

    from pipelines.validate.suites import _import_gx

    _import_gx()

    def resolve(i: int) -> list:
        return [suite_parameters.parse_suite_parameter("x * 2 + 1", suite_parameters={"x": i}) for _ in range(200)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(resolve, range(8)))
    assert results == [[2 * i + 1] * 200 for i in range(8)]
