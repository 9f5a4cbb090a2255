"""End to end, as a shopper: a real headless Chromium on the live shop page, a real Celery worker encoding with
version 0 fitted on the catalog, the real PostgreSQL + pgvector and Redis. Upload a photo of a catalog item; that
item must come first."""

from __future__ import annotations

import io
import os
import re
import shutil
from decimal import Decimal

import pytest
from django.db import transaction
from PIL import Image

from catalog.models import GoldenQuery, Merchant, ModelVersion, RecentQuery
from catalog.services import model_versions, products
from tests import factories
from tests.waiting import wait_until
from workers import pipelines
from workers.ml.datasets.render import render_product

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
PRODUCTS = 8  # enough for ITQ to find 32 directions' worth of signal, small enough to fit in seconds
VIEWS = 2  # catalog photos per product
PLANTED = 5  # the product the shopper photographs
ACTIVATION_TIMEOUT_S = 180
TABLE_SIZE = (640, 480)
TABLE_TILE = (360, 180, 200)  # left, top, side of the product in the table photo


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def indexed_shop(settings, tmp_path, celery_worker_on):
    """A small rendered catalog, version 0 fitted and activated by a real worker that keeps serving queries."""
    settings.MODELS_DIR = tmp_path
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"search": "1000/min"}}
    merchant = factories.merchant("studio")
    photos = {}
    for seed in range(PRODUCTS):
        record = render_product(seed, view=0)
        product = products.product_upsert(
            merchant=merchant, sku=f"R-{seed}", title=record.extra["title"], category=f"cat{seed % 3}",
            price=Decimal("10") + seed,
        ).product  # fmt: skip
        for view in range(VIEWS):
            photo = _png(render_product(seed, view=view).image)
            products.image_add(product=product, data=photo, position=view)
            photos[(seed, view)] = photo
    with celery_worker_on("train", "embed", "search"):
        with transaction.atomic():
            version = model_versions.model_version_bootstrap(code_bits=32, fc7_dim=16)
        wait_until(
            lambda: ModelVersion.objects.get(pk=version.pk).status == ModelVersion.Status.ACTIVE,
            timeout=ACTIVATION_TIMEOUT_S, interval=0.3, message=lambda: ModelVersion.objects.get(pk=version.pk).metrics,
        )  # fmt: skip
        yield photos


@pytest.mark.django_db(transaction=True)
def test_the_search_api_finds_the_photographed_product_through_the_worker(indexed_shop, client):
    from django.core.files.uploadedfile import SimpleUploadedFile

    photo = indexed_shop[(PLANTED, 0)]
    response = client.post("/api/search", {"image": SimpleUploadedFile("shot.png", photo), "k": 4})
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["results"][0]["product"]["sku"] == f"R-{PLANTED}"
    assert body["timings_ms"]["encode"] > 0 and body["query"]["category"] in {"cat0", "cat1", "cat2"}
    # The photo alone is encoded exactly as the catalog image was: the same code. (As served, the photo is mixed with
    # its best item box, item fusion, so its code is a few bits off while the product stays first.)
    alone = client.post("/api/search", {"image": SimpleUploadedFile("shot.png", photo), "k": 4, "item_fusion": "0"})
    assert alone.json()["results"][0]["product"]["sku"] == f"R-{PLANTED}"
    assert alone.json()["results"][0]["explanation"]["hamming_distance"] == 0

    cropped = client.post(
        "/api/search", {"image": SimpleUploadedFile("shot.png", photo), "box": "0.02,0.02,0.98,0.98", "k": 4}
    )
    assert cropped.status_code == 200 and cropped.json()["results"][0]["product"]["sku"] == f"R-{PLANTED}"


@pytest.mark.django_db(transaction=True)
def test_searches_join_the_recent_query_sample_only_where_the_shop_allows_it(indexed_shop, client, settings):
    from django.core.files.uploadedfile import SimpleUploadedFile

    settings.RECENT_QUERY_SAMPLE_RATE = 1.0  # every search is sampled
    photo = indexed_shop[(PLANTED, 0)]
    assert client.post("/api/search", {"image": SimpleUploadedFile("s.png", photo), "k": 2}).status_code == 200
    assert not RecentQuery.objects.exists()  # the shop has not allowed it (the default)
    Merchant.objects.filter(slug="studio").update(keep_recent_queries=True)
    form = {"image": SimpleUploadedFile("s.png", photo), "k": 2, "merchant": "studio"}
    assert client.post("/api/search", form).status_code == 200
    kept = RecentQuery.objects.get()
    assert kept.merchant.slug == "studio" and kept.photo.path.startswith(str(settings.PRIVATE_MEDIA_ROOT))


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_shopper_uploads_a_photo_and_sees_that_product_first(indexed_shop, live_server, tmp_path, monkeypatch):
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; CI installs it)")
    # Playwright's sync API runs an event loop in this thread, so Django refuses ORM calls here unless told that this
    # (test-only) thread may make them: the checks below read what the page's requests stored.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import expect, sync_playwright

    photo_path = tmp_path / "my-photo.png"
    photo_path.write_bytes(indexed_shop[(PLANTED, 0)])
    table = Image.new("RGB", TABLE_SIZE, (200, 190, 170))  # the planted product on a plain table, at a known place
    left, top, side = TABLE_TILE
    table.paste(render_product(PLANTED, view=0).image.convert("RGB").resize((side, side)), (left, top))
    table_path = tmp_path / "on-the-table.png"
    table_path.write_bytes(_png(table))
    # the version's golden-set evaluation fits the "same product" calibration the badges show; the shop keeps
    # shoppers' photos given with consent
    pipelines.version_evaluate_golden(version_id=ModelVersion.objects.get(status=ModelVersion.Status.ACTIVE).pk)
    Merchant.objects.filter(slug="studio").update(golden_from_shoppers=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            # what the page sends as `box` with each search (read back below)
            page.add_init_script(
                "window.sentBoxes = []; const send = window.fetch; window.fetch = (url, options) => {"
                " if (options && options.body instanceof FormData) window.sentBoxes.push(options.body.get('box'));"
                " return send(url, options); };"
            )
            page.goto(live_server.url + "/")
            expect(page.locator("h1")).to_have_text("shop_search")
            page.set_input_files("#image-input", str(photo_path))

            first = page.locator("#results .result").first
            expect(first).to_be_visible(timeout=60_000)
            assert first.get_attribute("data-sku") == f"R-{PLANTED}"
            expect(page.locator("#status")).to_contain_text("products found")
            expect(page.locator("#timings")).to_contain_text("encode")

            # the item the search found is pre-drawn on the photo, and offered with any others as a button
            expect(page.locator("#item-box")).to_be_visible()
            expect(page.locator("#item-choices")).to_contain_text("Item 1")

            first.locator(".why summary").click()
            # (a few bits from the catalog image's code: the photo is mixed with its best item box, item fusion)
            expect(first.locator(".why dl")).to_contain_text(re.compile(r"Hamming distance\s*\d+ of 32 bits"))
            badge = first.locator(".match")
            expect(badge).to_be_visible()
            assert badge.text_content() in {"exact match", "similar"} and "% likely" in badge.get_attribute("title")

            first.locator(".confirm").click()  # "this is the one" without consent: nothing is sent
            expect(page.locator("#status")).to_contain_text("Tick the box")
            assert not GoldenQuery.objects.exists()
            page.check("#consent")
            first.locator(".confirm").click()
            expect(page.locator("#status")).to_contain_text("thank you")
            assert GoldenQuery.objects.get().product.sku == f"R-{PLANTED}"

            # A product lying on a table, small in the photo: the pre-drawn box is on it; picking the item searches it
            # alone (the shopper's box replaces the suggestion), and the shopper may still draw another box.
            page.set_input_files("#image-input", str(table_path))
            expect(page.locator("#item-box")).to_be_visible(timeout=60_000)
            drawn, photo_rect = page.locator("#item-box").bounding_box(), page.locator("#preview-image").bounding_box()
            centre_x = photo_rect["x"] + photo_rect["width"] * (TABLE_TILE[0] + TABLE_TILE[2] / 2) / TABLE_SIZE[0]
            centre_y = photo_rect["y"] + photo_rect["height"] * (TABLE_TILE[1] + TABLE_TILE[2] / 2) / TABLE_SIZE[1]
            assert drawn["x"] < centre_x < drawn["x"] + drawn["width"], (drawn, photo_rect)
            assert drawn["y"] < centre_y < drawn["y"] + drawn["height"], (drawn, photo_rect)
            assert drawn["width"] < 0.9 * photo_rect["width"]  # the item, not the whole photo
            suggested = page.locator("#item-choices button").first.get_attribute("title")
            with page.expect_response(lambda response: response.url.endswith("/api/search")):
                page.locator("#item-choices button").first.click()
            # the item's box went with the photo (Chromium does not hand Playwright a multipart body with a file)
            sent = page.evaluate("window.sentBoxes[window.sentBoxes.length - 1]")
            assert sent and [round(float(v), 2) for v in sent.split(",")] == [
                float(v) for v in suggested[suggested.index("(") + 1 : suggested.index(")")].split(", ")
            ], (sent, suggested)
            expect(page.locator("#crop-box")).to_be_visible()
            expect(page.locator("#item-box")).to_be_hidden()
            expect(page.locator("#item-choices button").first).to_have_class("item-choice chosen")
            expect(page.locator("#status")).to_contain_text("products found")

            page.set_input_files("#image-input", {"name": "notes.png", "mimeType": "image/png", "buffer": b"nope"})
            expect(page.locator("#error")).to_contain_text("invalid image")
        finally:
            browser.close()
