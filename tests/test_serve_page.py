"""The search page at `/`, in a real browser: Debian's chromium, headless, driven by playwright.

A shopper uploads a product photo (or pastes its URL), picks a category, and sees the matching
products as cards with thumbnails, scores and product ids; with an API key the browser's login
prompt (the key as password) is all it takes.
"""
from __future__ import annotations

import shutil

import pytest

from pipelines.client import pull
from pipelines.serve import ServeSettings
from serving import OPENCLIPART, RealCatalog, Service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(not OPENCLIPART.is_dir(), reason="sample catalog (openclipart-png) not installed"),
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (infra/setup.sh installs it)"),
]
KEY = "page-test-key-0123456789"


def test_a_shopper_finds_the_product_of_an_uploaded_photo(tmp_path, fault_server):
    from playwright.sync_api import expect, sync_playwright

    catalog = RealCatalog(tmp_path, per_category=4)
    manifest = catalog.publish()
    pull(catalog.uri, tmp_path / "serving")
    product, category, photo = catalog.images[6]
    settings = ServeSettings(snapshot_dir=str(tmp_path / "serving"), port=0, api_key=KEY,
                             allow_private_image_urls=True)
    with Service(settings) as service, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_context(http_credentials={"username": "shopper", "password": KEY}).new_page()
            page.goto(service.url + "/")
            expect(page.locator("#snapshot")).to_contain_text(manifest["snapshot_id"])
            page.set_input_files("#image", str(photo))
            page.select_option("#category", category)
            page.click("#go")
            cards = page.locator(".card")
            expect(cards.first).to_have_attribute("data-product-id", product)
            expect(cards.first).to_contain_text(product)
            expect(cards.first.locator(".score")).to_have_text("1.0000")
            assert {page.locator(".card").nth(i).inner_text().split("· ")[-1].split("\n")[0]
                    for i in range(cards.count())} == {category}
            expect(page.locator("#status")).to_contain_text(manifest["snapshot_id"])

            # Pasting an image URL instead (the page sends JSON {"image_url": ...}), all categories.
            other_product, _, other_photo = catalog.images[1]
            page.reload()
            expect(page.locator("#snapshot")).to_contain_text(manifest["snapshot_id"])
            page.fill("#image_url", fault_server.put(other_photo.name, other_photo.read_bytes()))
            page.click("#go")
            expect(page.locator(".card").first).to_have_attribute("data-product-id", other_product)

            # A file that is not an image: the page shows the service's reason, no results.
            bad = tmp_path / "notes.png"
            bad.write_text("not a picture")
            page.set_input_files("#image", str(bad))
            page.click("#go")
            expect(page.locator("#status")).to_contain_text("not_an_image")
            expect(page.locator(".card")).to_have_count(0)

            # Without the key the browser gets nothing but the login challenge (headless chromium has
            # no prompt to show, so the navigation fails).
            anonymous = browser.new_context()
            answer = anonymous.request.get(service.url + "/")
            assert answer.status == 401 and answer.headers["www-authenticate"].startswith("Basic")
            with pytest.raises(Exception, match="AUTH"):
                anonymous.new_page().goto(service.url + "/")
        finally:
            browser.close()
