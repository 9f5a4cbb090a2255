"""End to end, as a shopper: a real headless Chromium on the live shop page, a real Celery worker encoding with
version 0 fitted on the catalog, the real PostgreSQL + pgvector and Redis. Upload a photo of a catalog item; that
item must come first."""

from __future__ import annotations

import io
import os
import shutil
from decimal import Decimal

import pytest
from django.db import transaction

from catalog.models import ModelVersion
from catalog.services import model_versions, products
from tests import factories
from tests.waiting import wait_until
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
    assert body["results"][0]["explanation"]["hamming_distance"] == 0
    assert body["timings_ms"]["encode"] > 0 and body["query"]["category"] in {"cat0", "cat1", "cat2"}

    cropped = client.post(
        "/api/search", {"image": SimpleUploadedFile("shot.png", photo), "box": "0.02,0.02,0.98,0.98", "k": 4}
    )
    assert cropped.status_code == 200 and cropped.json()["results"][0]["product"]["sku"] == f"R-{PLANTED}"


@pytest.mark.browser
@pytest.mark.django_db(transaction=True)
def test_a_shopper_uploads_a_photo_and_sees_that_product_first(indexed_shop, live_server, tmp_path):
    if not shutil.which(CHROMIUM) and not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; CI installs it)")
    from playwright.sync_api import expect, sync_playwright

    photo_path = tmp_path / "my-photo.png"
    photo_path.write_bytes(indexed_shop[(PLANTED, 0)])
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(live_server.url + "/")
            expect(page.locator("h1")).to_have_text("shop_search")
            page.set_input_files("#image-input", str(photo_path))

            first = page.locator("#results .result").first
            expect(first).to_be_visible(timeout=60_000)
            assert first.get_attribute("data-sku") == f"R-{PLANTED}"
            expect(page.locator("#status")).to_contain_text("products found")
            expect(page.locator("#timings")).to_contain_text("encode")

            first.locator(".why summary").click()
            expect(first.locator(".why dl")).to_contain_text("0 of 32 bits")

            page.set_input_files("#image-input", {"name": "notes.png", "mimeType": "image/png", "buffer": b"nope"})
            expect(page.locator("#error")).to_contain_text("invalid image")
        finally:
            browser.close()
