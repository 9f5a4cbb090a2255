"""Adding a product image by URL through the merchant API: the request answers 202 at once with an image fetch to
poll, even when the image host hangs; a real worker fetches it (the fetch deadline ends a hanging host), and the
fetch ends done with its image, or failed with the reason. Another merchant cannot see the fetch."""

from __future__ import annotations

import time

import pytest
from django.urls import reverse

from catalog.models import ImageFetch, ProductImage
from shop_search.celery import app
from tests import factories
from tests.catalog.hanging_http import hanging_server
from tests.waiting import wait_until

LOCAL = ["127.0.0.1/32"]


def _poll(client, answer: dict) -> dict | None:
    state = client.get(answer["status_url"]).json()
    return state if state["state"] != "pending" else None


@pytest.mark.django_db(transaction=True)
def test_an_image_by_url_is_fetched_by_a_worker_and_the_request_never_waits(
    merchant_client, celery_worker_on, settings
):
    settings.IMAGE_FETCH_ALLOWED_NETWORKS = LOCAL
    settings.IMAGE_FETCH_DEADLINE_S = 2.0
    merchant = factories.merchant()
    product = factories.product(merchant)
    client = merchant_client(merchant=merchant)
    route = reverse("api:merchant-product-images", args=[product.pk])
    app.control.purge()
    with hanging_server() as base:
        started = time.perf_counter()
        good = client.post(route, {"url": f"{base}/img.png", "position": 1}, format="json")
        hanging = client.post(route, {"url": f"{base}/trickle-headers"}, format="json")
        request_ms = (time.perf_counter() - started) * 1000 / 2
        assert good.status_code == hanging.status_code == 202, (good.content, hanging.content)
        assert good.json()["state"] == "pending" and ProductImage.objects.count() == 0  # nothing fetched yet
        with celery_worker_on("embed", purge=False):
            done = wait_until(lambda: _poll(client, good.json()), timeout=60, message="the good fetch never ended")
            failed = wait_until(lambda: _poll(client, hanging.json()), timeout=60, message="the hang never ended")
    print(f"\nPOST image by URL answered in {request_ms:.0f} ms; the hanging host was given up after its 2 s deadline")
    assert request_ms < 1_000
    assert done["state"] == "done" and done["image"]["position"] == 1 and done["error"] == ""
    assert done["image"]["source_url"] == f"{base}/img.png"
    assert ProductImage.objects.filter(product=product).count() == 1
    assert failed["state"] == "failed" and "took longer than 2 s" in failed["error"], failed
    other = merchant_client(merchant=factories.merchant("other"))
    assert other.get(good.json()["status_url"]).status_code == 404
    assert ImageFetch.objects.count() == 2
