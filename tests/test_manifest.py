"""Manifest reading: three formats, three places, clear errors, row-level quarantine."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import CrawlSettings
from pipelines.crawl.manifest import ManifestError, read_manifest, split_manifest_rows
from pipelines.storage import open_storage

ROWS = [{"product_id": "007", "category": "food", "image_url": "http://h/a.png", "title": "Apple"},
        {"product_id": "8", "category": "tools", "image_url": "http://h/b.png", "title": None}]


def write_all_formats(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("product_id,category,image_url,title\n007,food,http://h/a.png,Apple\n8,tools,http://h/b.png,\n")
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    gz = tmp_path / "m.csv.gz"
    gz.write_bytes(gzip.compress(csv.read_bytes()))
    return [csv, jsonl, parquet, gz]


def test_formats_agree_and_keep_leading_zeros(tmp_path):
    for path in write_all_formats(tmp_path):
        table = read_manifest(str(path))
        assert table.column("product_id").to_pylist() == ["007", "8"], path
        assert table.column("row_index").to_pylist() == [0, 1]
        assert table.column("category").to_pylist() == ["food", "tools"]


def test_manifest_over_http_and_s3(tmp_path, fault_server, s3_bucket):
    csv = write_all_formats(tmp_path)[0]
    url = fault_server.put("catalog.csv", csv.read_bytes())
    assert read_manifest(url, crawl=CrawlSettings(allow_private_hosts=True)).num_rows == 2
    # The crawl's address policy applies to the feed too: 127.0.0.1 is refused by default.
    with pytest.raises(ManifestError, match="ssrf_blocked"):
        read_manifest(url)
    bucket, settings = s3_bucket
    open_storage(f"s3://{bucket}", settings).write_bytes("feeds/catalog.jsonl", (tmp_path / "m.jsonl").read_bytes())
    assert read_manifest(f"s3://{bucket}/feeds/catalog.jsonl", settings).num_rows == 2


def test_missing_column_names_what_was_found(tmp_path):
    path = tmp_path / "catalog.csv"
    path.write_text("id,url,cat\n1,http://h/a.png,food\n")
    with pytest.raises(ManifestError) as exc:
        read_manifest(str(path))
    message = str(exc.value)
    assert "'product_id', 'category', 'image_url' missing in catalog.csv" in message
    assert "found: id, url, cat" in message


def test_unreadable_manifests(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(tmp_path / "nope.csv"))
    with pytest.raises(ManifestError, match="format"):
        read_manifest(str(tmp_path / "catalog.xlsx"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="not valid PARQUET"):
        read_manifest(str(bad))


def test_row_problems_are_quarantined_not_fatal(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("product_id,category,image_url\n"
                    "p1,food,http://h/a.png\n"
                    "p1,food,http://h/a.png\n"       # exact duplicate
                    " p1 ,food,http://h/a.png \n"    # duplicate once whitespace is stripped
                    "p2,food,http://h/a.png\n"       # same image, other product: kept
                    ",food,http://h/c.png\n"         # missing product id
                    "p3,,\n")
    keep, rejected = split_manifest_rows(read_manifest(str(path)).to_pandas())
    assert keep["row_index"].tolist() == [0, 3]
    assert dict(zip(rejected["row_index"], rejected["reason"])) == {
        1: "duplicate_row", 2: "duplicate_row", 4: "missing_field", 5: "missing_field"}
    assert rejected.set_index("row_index").loc[5, "detail"] == "empty category, image_url"


def test_gzip_bomb_manifest_stops_at_the_decompression_cap(tmp_path):
    # 200 MB of one repeated row compresses to ~200 KB; the cap stops it after 5 MB decoded.
    row = b"p1,food,http://h/a.png\n"
    bomb = tmp_path / "bomb.csv.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as fh:
        fh.write(b"product_id,category,image_url\n")
        for _ in range(200):
            fh.write(row * (1_000_000 // len(row)))
    assert bomb.stat().st_size < 1_000_000
    with pytest.raises(ManifestError, match="decompresses to more than crawl.max_manifest_bytes"):
        read_manifest(str(bomb), crawl=CrawlSettings(max_manifest_bytes=5_000_000))


@pytest.mark.parametrize("where", ["file", "http"])
def test_oversized_manifest_is_refused(tmp_path, fault_server, where):
    csv = tmp_path / "big.csv"
    csv.write_bytes(b"product_id,category,image_url\n" + b"p,food,http://h/a.png\n" * 10_000)
    uri = str(csv) if where == "file" else fault_server.put("big.csv", csv.read_bytes())
    with pytest.raises(ManifestError, match="cap of 100,000 bytes"):
        read_manifest(uri, crawl=CrawlSettings(allow_private_hosts=True, max_manifest_bytes=100_000))


def test_trickling_manifest_server_is_bounded(fault_server):
    import time

    started = time.monotonic()
    with pytest.raises(ManifestError, match="timeout"):
        read_manifest(fault_server.url("trickle-body/feed.csv"), crawl=CrawlSettings(
            allow_private_hosts=True, manifest_timeout_s=1.5))
    assert time.monotonic() - started < 1.5 + 1.5


def test_overlong_urls_are_quarantined_as_bad_url():
    import pandas as pd

    frame = pd.DataFrame({"row_index": [0, 1], "product_id": ["p1", "p2"], "category": ["food", "food"],
                          "image_url": ["http://h/a.png", "http://h/" + "a" * 10_000_000], "title": [None, None]})
    keep, rejected = split_manifest_rows(frame, max_url_length=8192)
    assert list(keep["product_id"]) == ["p1"]
    assert list(rejected["reason"]) == ["bad_url"] and len(rejected["detail"].iloc[0]) < 200
