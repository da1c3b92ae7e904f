"""Crawl stage end to end: real local Spark, a real misbehaving HTTP server, S3 over HTTP."""
import csv
import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_jpeg, make_noise_png, make_png
from pipelines import layout
from pipelines.config import load_settings
from pipelines.crawl.stage import read_crawl_state, read_current_images, run_crawl
from pipelines.storage import open_storage
from test_image_check import png_header_only

pytestmark = pytest.mark.spark


def write_manifest(path: Path, rows: list[tuple]) -> str:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_id", "category", "image_url", "title"])
        writer.writerows(rows)
    return str(path)


def settings_for(warehouse: str, **crawl):
    return load_settings(warehouse=warehouse, crawl={"allow_private_hosts": True, "retries": 1, "backoff_s": 0.01,
                                                     "read_timeout_s": 1, "total_timeout_s": 2, "rows_per_task": 4,
                                                     "max_pixels": 5_000_000, **crawl})


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def catalog(fault_server, tmp_path):
    """A catalog with good images in two categories and one of every kind of bad row."""
    good = {f"g{i}.png": make_png(color=(20 * i, 100, 50), pattern=i) for i in range(6)}
    good["photo.jpg"] = make_jpeg()
    for name, data in good.items():
        fault_server.put(name, data)
    fault_server.put("bomb.png", png_header_only(30_000, 30_000))
    fault_server.put("vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg"></svg>')
    fault_server.put("cut.png", make_png(size=(300, 200), pattern=4))
    fault_server.put("crawl.png", make_png(size=(300, 300), pattern=6))
    u = fault_server.url
    rows = [(f"p{i}", "food" if i < 3 else "tools", u(f"img/g{i}.png"), f"item {i}") for i in range(6)]
    rows += [
        ("p6", "tools", u("img/photo.jpg"), "jpeg"),
        ("p6", "tools", u("img/photo.jpg"), "same row again"),          # duplicate_row
        ("p7", "tools", u("img/g0.png"), "another product, same image"),  # kept: 2 products share an image
        ("", "tools", u("img/g1.png"), "no product id"),                  # missing_field
        ("b1", "food", u("status/404"), ""),
        ("b2", "food", u("status/500"), ""),
        ("b3", "food", u("html-as-jpeg"), ""),
        ("b4", "food", u("empty"), ""),
        ("b5", "food", u("lying-length/cut.png"), ""),
        ("b6", "food", u("img/bomb.png"), ""),
        ("b7", "food", u("img/vector.svg"), ""),
        ("b8", "food", "htp:/broken url", ""),
        ("b9", "food", f"http://127.0.0.1:{closed_port()}/x.png", ""),
        ("b10", "food", u("slow/crawl.png"), ""),
        # hostile servers and feeds: each one row's outcome, none the task's
        ("p8", "tools", u("gzip/photo.jpg"), "served gzip-encoded: kept"),
        ("b11", "food", u("bad-gzip"), ""),
        ("b12", "food", u("redirect?to=http://[oops/x"), ""),
        ("b13", "food", u("trickle-headers"), ""),
        ("b14", "food", "http://images.example.com/" + "a" * 10_000_000, "a 10 MB URL"),
        ("b15", "food", u("redirect?to=http://169.254.169.254/latest/meta-data/"), ""),
        ("b16", "food", f"s3://not-allowed-{closed_port()}/a.png", ""),
    ]
    return write_manifest(tmp_path / "catalog.csv", rows), good


EXPECTED_REASONS = {"duplicate_row": 1, "missing_field": 1, "http_404": 1, "http_500": 1, "not_an_image": 1,
                    "empty_body": 1, "decompression_bomb": 1, "unsupported_format": 1, "bad_url": 2,
                    "connection_error": 1, "timeout": 2, "truncated": 1, "bad_encoding": 1, "bad_redirect": 1,
                    "ssrf_blocked": 2}


def test_every_row_is_accounted_for(spark, catalog, tmp_path):
    manifest, good = catalog
    warehouse = (tmp_path / "wh").as_uri()
    summary = run_crawl(settings_for(warehouse), manifest, "20261101T000000Z", spark=spark)

    assert summary.manifest_rows == 27
    assert summary.fetched == 9
    assert summary.quarantine_reasons == EXPECTED_REASONS
    assert summary.accounted == summary.manifest_rows == summary.fetched + summary.quarantined

    storage = open_storage(warehouse)
    quarantine = storage.read_table(layout.quarantine_prefix(summary.run_id, "crawl")).to_pandas()
    assert len(quarantine) == summary.quarantined
    assert set(quarantine["product_id"].fillna("")) >= {f"b{i}" for i in range(1, 17)} | {""}
    assert (quarantine["stage"] == "crawl").all() and quarantine["detail"].notna().all()
    assert quarantine["detail"].str.len().max() < 1000  # no URL or server text is carried whole into a detail

    images = read_current_images(storage, summary.run_id, with_bytes=True)
    assert sorted(images["product_id"]) == ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8"]
    for row in images.itertuples():
        assert hashlib.sha256(row.image).hexdigest() == row.sha256
        assert row.image == good[row.image_url.rsplit("/", 1)[1]]  # decoded bytes, not the gzip stream
    jpeg = images.set_index("product_id").loc["p6"]
    assert (jpeg.format, jpeg.width, jpeg.height) == ("JPEG", 80, 60)

    # A category can be read alone: its own partition folder.
    food = storage.list(layout.images_category_prefix("food"))
    assert food and all(f"run_id={summary.run_id}/" in key for key in food)
    assert set(read_current_images(storage, summary.run_id, categories=["tools"])["category"]) == {"tools"}


def test_second_crawl_is_incremental(spark, fault_server, tmp_path):
    for i in range(5):
        fault_server.put(f"i{i}.png", make_png(color=(40 * i, 80, 90), pattern=i))
    rows = [(f"p{i}", "food", fault_server.url(f"img/i{i}.png"), "") for i in range(5)]
    warehouse = (tmp_path / "wh").as_uri()
    settings = settings_for(warehouse)
    first = run_crawl(settings, write_manifest(tmp_path / "m1.csv", rows), "20261101T000000Z", spark=spark)
    assert first.fetched == 5
    fault_server.log.clear()

    # Night two: i1 changed, i2 is failing (503), p4 left the catalog, p5 is new.
    fault_server.put("i1.png", make_png(color=(1, 2, 3), pattern=9))
    fault_server.put("i5.png", make_png(color=(9, 9, 9), pattern=2))
    night2 = rows[:4] + [("p5", "food", fault_server.url("img/i5.png"), "")]
    storage = open_storage(warehouse)
    fault_server.files["i2.png"] = None  # answered with 503 below
    original = fault_server.httpd.RequestHandlerClass._image

    def busy_for_missing(handler, name):
        if fault_server.files.get(name) is None:
            return handler._send(503, b"busy", content_type="text/plain")
        return original(handler, name)

    fault_server.httpd.RequestHandlerClass._image = busy_for_missing
    second = run_crawl(settings, write_manifest(tmp_path / "m2.csv", night2), "20261102T000000Z", spark=spark)

    assert second.previous_run_id == "20261101T000000Z"
    assert (second.fetched, second.not_modified, second.stale, second.removed) == (2, 2, 1, 1)
    assert second.stale_reasons == {"http_503": 1}
    unchanged = [e for e in fault_server.log if e[0] in ("/img/i0.png", "/img/i3.png")]
    assert unchanged and all(status == 304 and conditional for _, status, conditional in unchanged)
    assert second.bytes_downloaded == len(fault_server.files["i1.png"]) + len(fault_server.files["i5.png"])

    state = read_crawl_state(storage, second.run_id).set_index("product_id")
    assert state.loc["p4", "status"] == "removed"
    assert state.loc["p2", "status"] == "stale" and state.loc["p2", "error"] == "http_503"
    assert state.loc["p0", "stored_run_id"] == first.run_id    # bytes not copied again
    assert state.loc["p1", "stored_run_id"] == second.run_id
    current = read_current_images(storage, second.run_id, with_bytes=True).set_index("product_id")
    assert sorted(current.index) == ["p0", "p1", "p2", "p3", "p5"]
    assert current.loc["p1", "image"] == fault_server.files["i1.png"]
    assert current.loc["p2", "image"] is not None  # the last good copy stays searchable


def test_a_response_broken_on_the_wire_keeps_last_nights_copy_a_cut_off_file_does_not(spark, fault_server,
                                                                                        tls_files, tmp_path):
    """Night two: a body cut before its Content-Length, a reply that is not HTTP and a TLS handshake
    that fails (the CA bundle was swapped) say nothing about the image: those rows stay `stale` with
    last night's bytes. A whole response holding a cut-off PNG is the image's fault: quarantined."""
    from fault_server import FaultServer

    tls_server = FaultServer(tls=tls_files).start()
    try:
        for i in range(4):
            fault_server.put(f"w{i}.png", make_png(color=(60 * i, 20, 200), pattern=i))
        tls_server.put("w4.png", make_png(color=(5, 200, 5), pattern=7))
        rows = [(f"p{i}", "food", fault_server.url(f"img/w{i}.png"), "") for i in range(4)]
        rows.append(("p4", "food", tls_server.url("img/w4.png"), ""))
        manifest = write_manifest(tmp_path / "m.csv", rows)
        warehouse = (tmp_path / "wh").as_uri()
        first = run_crawl(settings_for(warehouse, ca_bundle=tls_files[0]), manifest, "20261101T000000Z", spark=spark)
        assert first.fetched == 5

        whole = fault_server.files["w2.png"]
        fault_server.put("w2.png", whole[: len(whole) // 2])  # served whole, with its own Content-Length
        original = fault_server.httpd.RequestHandlerClass._image

        def broken(handler, name):
            if name == "w0.png":  # the body ends before the declared Content-Length
                data = fault_server.files[name]
                handler._send(200, data[: len(data) // 2], content_type="image/png",
                              headers={"Content-Length": str(len(data)), "Connection": "close"})
                handler.close_connection = True
                return 200
            if name == "w1.png":  # not HTTP at all
                handler._status = 0
                handler.wfile.write(b"SSH-2.0-OpenSSH_9.6 not an HTTP server\r\n\r\n")
                handler.close_connection = True
                return 0
            return original(handler, name)

        fault_server.httpd.RequestHandlerClass._image = broken
        try:
            second = run_crawl(settings_for(warehouse), manifest, "20261102T000000Z", spark=spark)  # no CA bundle
        finally:
            fault_server.httpd.RequestHandlerClass._image = original
    finally:
        tls_server.stop()

    assert (second.stale, second.not_modified, second.quarantined) == (3, 1, 1)
    assert second.stale_reasons == {"truncated": 1, "bad_response": 1, "tls_error": 1}
    storage = open_storage(warehouse)
    state = read_crawl_state(storage, second.run_id).set_index("product_id")
    assert dict(state["status"]) == {"p0": "stale", "p1": "stale", "p3": "not_modified", "p4": "stale"}
    quarantine = storage.read_table(layout.quarantine_prefix(second.run_id, "crawl")).to_pylist()
    assert [(q["product_id"], q["reason"]) for q in quarantine] == [("p2", "truncated")]
    current = read_current_images(storage, second.run_id, with_bytes=True).set_index("product_id")
    assert sorted(current.index) == ["p0", "p1", "p3", "p4"]
    assert current.loc["p0", "image"] == fault_server.files["w0.png"]  # last night's whole bytes, searchable
    assert current.loc["p4", "image"] == tls_server.files["w4.png"]


def test_killed_run_resumes_only_unfinished_tasks(spark, fault_server, tmp_path):
    for i in range(12):
        fault_server.put(f"k{i}.png", make_png(color=(10 * i, 10, 10), pattern=i))
    rows = [(f"p{i}", "food", fault_server.url(f"img/k{i}.png"), "") for i in range(12)]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    warehouse = (tmp_path / "wh").as_uri()
    settings = settings_for(warehouse)  # 4 rows per task: 3 tasks
    run_crawl(settings, manifest, "r1", spark=spark)
    storage = open_storage(warehouse)
    # Simulate a kill after two tasks finished: no commit marker, one task marker missing.
    storage.delete(layout.crawl_success_key("r1"))
    [second] = [k for k in storage.list(f"{layout.crawl_prefix('r1')}tasks/") if "/part-00001" in k]
    storage.delete(second)
    fault_server.log.clear()

    summary = run_crawl(settings, manifest, "r1", spark=spark)
    assert summary.tasks_resumed == 2 and summary.fetched == 12
    assert len(fault_server.log) == 4  # only the unfinished task's rows were fetched again
    assert len(read_current_images(storage, "r1")) == 12


def test_rerunning_a_run_replaces_its_outputs_only(spark, fault_server, tmp_path):
    for i in range(3):
        fault_server.put(f"x{i}.png", make_png(color=(0, 50 * i, 0), pattern=i))
    rows = [(f"p{i}", "food", fault_server.url(f"img/x{i}.png"), "") for i in range(3)]
    warehouse = (tmp_path / "wh").as_uri()
    settings = settings_for(warehouse)
    run_crawl(settings, write_manifest(tmp_path / "a.csv", rows), "r1", spark=spark)
    run_crawl(settings, write_manifest(tmp_path / "b.csv", rows), "r2", spark=spark)
    storage = open_storage(warehouse)
    r1_before = {k: storage.read_bytes(k) for k in storage.list("runs/r1/")}
    before = read_crawl_state(storage, "r2").drop(columns=["checked_at"]).sort_values("product_id")

    run_crawl(settings, write_manifest(tmp_path / "b.csv", rows[:2]), "r2", spark=spark)  # r2's manifest changed
    run_crawl(settings, write_manifest(tmp_path / "b.csv", rows), "r2", spark=spark, resume=False)
    after = read_crawl_state(storage, "r2").drop(columns=["checked_at"]).sort_values("product_id")
    assert before.reset_index(drop=True).equals(after.reset_index(drop=True))
    assert {k: storage.read_bytes(k) for k in storage.list("runs/r1/")} == r1_before


def test_ssrf_guard_end_to_end(spark, fault_server, tmp_path):
    url = fault_server.put("s.png", make_png())
    manifest = write_manifest(tmp_path / "m.csv", [("p1", "food", url, ""), ("p2", "food", "http://localhost:9/x", "")])
    settings = load_settings(warehouse=(tmp_path / "wh").as_uri())  # default: private hosts refused
    summary = run_crawl(settings, manifest, "r1", spark=spark)
    assert summary.quarantine_reasons == {"ssrf_blocked": 2}
    assert fault_server.log == []


@pytest.mark.s3
def test_crawl_into_s3_warehouse_with_s3_images(spark, fault_server, s3_bucket, tmp_path):
    bucket, s3 = s3_bucket
    source = open_storage(f"s3://{bucket}", s3)
    source.write_bytes("cdn/a.png", make_png(pattern=1))
    http_url = fault_server.put("b.png", make_png(pattern=2))
    manifest_csv = "product_id,category,image_url,title\n" \
                   f"p1,food,s3://{bucket}/cdn/a.png,\np2,tools,{http_url},\np3,tools,s3://{bucket}/cdn/missing.png,\n"
    source.write_text("feeds/catalog.csv", manifest_csv)
    warehouse = f"s3://{bucket}/warehouse"
    other = f"{bucket}-other"
    source.client.create_bucket(Bucket=other)
    source.client.put_object(Bucket=other, Key="secret.png", Body=make_png(pattern=3))
    source.write_text("feeds/catalog.csv", manifest_csv + f"p4,tools,s3://{other}/secret.png,\n")
    settings = settings_for(warehouse, allow_s3_buckets=[bucket]).model_copy(update={"s3": s3})
    summary = run_crawl(settings, f"s3://{bucket}/feeds/catalog.csv", "r1", spark=spark)
    # Only allowed buckets are read with the pipeline's credentials.
    assert (summary.fetched, summary.quarantine_reasons) == (2, {"http_404": 1, "ssrf_blocked": 1})
    storage = open_storage(warehouse, s3)
    assert storage.exists(layout.crawl_success_key("r1"))
    assert any(k.startswith("images/category=food/run_id=r1/") for k in storage.list("images/"))
    images = read_current_images(storage, "r1", with_bytes=True).set_index("product_id")
    assert images.loc["p1", "image"] == source.read_bytes("cdn/a.png")
    # second night over S3: the S3 object is revalidated with its ETag, not downloaded again
    again = run_crawl(settings, f"s3://{bucket}/feeds/catalog.csv", "r2", spark=spark)
    assert (again.fetched, again.not_modified) == (0, 2)


def test_s3_image_reads_are_capped(fault_server, s3_bucket):
    from pipelines.config import CrawlSettings
    from pipelines.crawl.fetch import Fetcher

    bucket, s3 = s3_bucket
    source = open_storage(f"s3://{bucket}", s3)
    source.write_bytes("big.png", make_noise_png(size=(60, 60)))  # ~11 KB that does not compress
    source.write_bytes("small.png", make_png())
    f = Fetcher(CrawlSettings(allow_s3_buckets=[bucket], max_bytes=2000, retries=0), s3)
    big = f.fetch(f"s3://{bucket}/big.png")
    assert (big.outcome, big.reason) == ("failed", "too_large")
    assert f"object is {len(source.read_bytes('big.png')):,} bytes" in big.detail  # from the ranged GET's Content-Range
    assert f.fetch(f"s3://{bucket}/small.png").data == source.read_bytes("small.png")


def test_cli_reports_and_fails_clearly(tmp_path, fault_server):
    exe = str(Path(sys.executable).parent / "catalog-index")
    help_text = subprocess.run([exe, "crawl", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--manifest", "--warehouse", "--run-id", "--allow-private-hosts", "--categories", "--max-bytes",
                 "--retry-timeouts", "--max-url-length", "--allow-s3-buckets", "--proxy", "--timeout"):
        assert flag in help_text
    assert "(retries + 1) * timeout" in " ".join(help_text.split())  # the documented bound
    bad = tmp_path / "catalog.csv"
    bad.write_text("id,url\n1,http://x/a.png\n")
    result = subprocess.run([exe, "crawl", "--manifest", str(bad), "--warehouse", str(tmp_path / "wh")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing in catalog.csv (found: id, url)" in " ".join(result.stderr.split())


def test_category_backfill_leaves_other_categories_alone(spark, fault_server, tmp_path):
    rows = []
    for i in range(6):
        category = "food" if i % 2 else "tools"
        rows.append((f"p{i}", category, fault_server.put(f"c{i}.png", make_png(color=(30 * i, 0, 0), pattern=i)), ""))
    warehouse = (tmp_path / "wh").as_uri()
    settings = settings_for(warehouse)
    manifest = write_manifest(tmp_path / "m.csv", rows)
    run_crawl(settings, manifest, "r1", spark=spark)
    fault_server.log.clear()
    fault_server.put("c1.png", make_png(color=(1, 1, 1), pattern=3))  # a food image changed

    summary = run_crawl(settings, manifest, "r2", categories=["food"], spark=spark)
    assert (summary.fetched, summary.not_modified, summary.out_of_scope, summary.carried) == (1, 2, 3, 3)
    assert summary.accounted == summary.manifest_rows
    assert {path for path, _, _ in fault_server.log} == {"/img/c1.png", "/img/c3.png", "/img/c5.png"}
    storage = open_storage(warehouse)
    before = read_crawl_state(storage, "r1").set_index("product_id")
    after = read_crawl_state(storage, "r2").set_index("product_id")
    for pid in ("p0", "p2", "p4"):  # tools: not contacted, state carried as it was
        assert after.loc[pid, "status"] == "carried"
        assert after.loc[pid, "stored_key"] == before.loc[pid, "stored_key"]
    assert len(read_current_images(storage, "r2")) == 6


def test_a_bug_on_one_row_quarantines_that_row_not_the_task(fault_server, tmp_path, monkeypatch):
    # Fault injection: the image check raises something nobody planned for, on one URL.
    from pipelines.crawl import stage

    real = stage.inspect_image

    def inspect(data, *args, **kwargs):
        if data == fault_server.files["boom.png"]:
            raise ZeroDivisionError("unexpected")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(stage, "inspect_image", inspect)
    rows = [("p1", "food", fault_server.put("ok.png", make_png()), ""),
            ("p2", "food", fault_server.put("boom.png", make_png(pattern=5)), "")]
    summary = run_crawl(settings_for((tmp_path / "wh").as_uri()), write_manifest(tmp_path / "m.csv", rows), "r1",
                        runner="local")
    assert (summary.fetched, summary.quarantine_reasons) == (1, {"internal_error": 1})
    quarantine = open_storage((tmp_path / "wh").as_uri()).read_table(layout.quarantine_prefix("r1", "crawl"))
    assert "ZeroDivisionError: unexpected" in quarantine.to_pandas().set_index("product_id").loc["p2", "detail"]


def test_trickling_servers_do_not_take_the_good_rows_threads(fault_server):
    """Two fetch slots, three rows that trickle until their deadline: the good rows behind them
    start once the slow ones pass crawl.slow_fetch_s, not when their deadline ends."""
    import time

    from pipelines.config import CrawlSettings
    from pipelines.crawl.fetch import Fetcher
    from pipelines.crawl.stage import crawl_rows

    settings = CrawlSettings(allow_private_hosts=True, concurrency=2, slow_fetch_s=0.3, total_timeout_s=3,
                             read_timeout_s=2, retries=0)
    slow = [{"row_index": i, "product_id": f"s{i}", "category": "food", "image_url": fault_server.url("trickle-body")}
            for i in range(3)]
    good = [{"row_index": 10 + i, "product_id": f"g{i}", "category": "food",
             "image_url": fault_server.put(f"g{i}.png", make_png(pattern=i))} for i in range(8)]
    fetcher = Fetcher(settings)
    started = time.monotonic()
    outcomes = crawl_rows(slow + good, fetcher, settings, "r1")
    elapsed = time.monotonic() - started
    fetcher.close()
    assert [kind for kind, _ in outcomes] == ["quarantined"] * 3 + ["fetched"] * 8
    assert [record["product_id"] for _, record in outcomes] == [r["product_id"] for r in slow + good]  # in order
    assert {record["reason"] for kind, record in outcomes if kind == "quarantined"} == {"timeout"}
    last_good_start = max(record["checked_at"] for kind, record in outcomes if kind == "fetched")
    first_start = min(record.get("checked_at") or record["at"] for _, record in outcomes)
    # The 3rd slow row waits for a slot (0.3 s), then the good rows go; not after the 3 s deadlines.
    assert (last_good_start - first_start).total_seconds() < 1.5
    assert elapsed <= settings.total_timeout_s + 0.3 + 1.5
    assert fault_server.max_concurrency <= 2 * settings.concurrency  # slow rows are capped too
