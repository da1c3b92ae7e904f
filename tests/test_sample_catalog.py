"""The bundled sample catalog: a stable manifest over openclipart-png, served over real HTTP."""
import requests

from pipelines.sample_catalog import OPENCLIPART_DIR, ImageServer, build_sample_manifest, list_sample_images


def test_manifest_covers_every_category_and_is_stable():
    everything = list_sample_images()
    categories = {c for c, _ in everything}
    assert len(everything) > 6500 and len(categories) == 22
    assert not any("step.png" in path.name for _, path in everything)  # generated star polygons left out
    rows = build_sample_manifest("http://127.0.0.1:1", 300)
    assert len(rows) == 300
    assert {r["category"] for r in rows} == categories          # small categories keep one image at least
    assert rows == build_sample_manifest("http://127.0.0.1:1", 300)
    multi = [r for r in build_sample_manifest("http://h", None) if r["product_id"] == "people-sm"]
    assert len(multi) > 1  # name_01.png, name_02.png ... are one product with several images


def test_server_serves_images_with_validators():
    rows = build_sample_manifest("PLACEHOLDER", 5)
    with ImageServer(OPENCLIPART_DIR) as server:
        url = rows[0]["image_url"].replace("PLACEHOLDER", server.base_url)
        first = requests.get(url, timeout=5)
        assert first.status_code == 200 and first.content[:4] == b"\x89PNG"
        again = requests.get(url, headers={"If-None-Match": first.headers["ETag"]}, timeout=5)
        assert again.status_code == 304 and again.content == b""
        since = requests.get(url, headers={"If-Modified-Since": first.headers["Last-Modified"]}, timeout=5)
        assert since.status_code == 304
        assert requests.get(server.base_url + "/../../etc/passwd", timeout=5).status_code == 404
