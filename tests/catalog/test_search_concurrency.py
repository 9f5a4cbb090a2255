"""A web process runs at most SEARCH_MAX_CONCURRENT shopper searches at once; one more waits for a slot at most
SEARCH_SLOT_WAIT_MS, then is answered with 503 and Retry-After (not queued any longer), and the rest of the site keeps
its threads."""

import threading
import time

import pytest
from django.db import connection
from rest_framework.test import APIClient

from catalog import search
from tests import factories
from tests.catalog import searchkit


@pytest.mark.django_db(transaction=True)  # the requests run in threads, each on its own database connection
def test_searches_over_the_per_process_cap_get_503_with_retry_after(settings, monkeypatch):
    settings.SEARCH_MAX_CONCURRENT = 2
    version = searchkit.active_version()
    planted = searchkit.random_catalog(merchant=factories.merchant(), version=version, count=5)[0]
    url = f"/api/products/{planted.product.pk}/similar"
    gate, entered = threading.Event(), threading.Semaphore(0)
    real_similar = search.similar_products

    def held_similar(**kwargs):
        entered.release()
        assert gate.wait(timeout=30)
        return real_similar(**kwargs)

    monkeypatch.setattr(search, "similar_products", held_similar)
    codes: list[int] = []

    def shopper(n: int) -> None:
        try:
            codes.append(APIClient(REMOTE_ADDR=f"10.46.0.{n}").get(url).status_code)
        finally:
            connection.close()

    holders = [threading.Thread(target=shopper, args=(n,)) for n in (1, 2)]
    for thread in holders:
        thread.start()
    for _ in holders:
        assert entered.acquire(timeout=30)  # both slots are taken, by searches still running

    started = time.perf_counter()
    busy = APIClient(REMOTE_ADDR="10.46.0.3").get(url)
    busy_ms = (time.perf_counter() - started) * 1000
    assert settings.SEARCH_SLOT_WAIT_MS == 300  # the shipped default, which this test runs with
    photo = APIClient(REMOTE_ADDR="10.46.0.4").post("/api/search", {"image": _png()})
    health = APIClient(REMOTE_ADDR="10.46.0.5").get("/healthz")

    gate.set()
    for thread in holders:
        thread.join(timeout=30)

    assert busy.status_code == 503 and busy["Retry-After"] == "2"
    assert "too many searches in progress" in busy.json()["detail"]
    assert 300 <= busy_ms < 1300, busy_ms  # refused after the short wait for a slot, not after the running searches
    assert photo.status_code == 503 and photo["Retry-After"] == "2"  # one cap for both search routes
    assert health.status_code == 200
    assert sorted(codes) == [200, 200]
    # the slots are given back
    assert APIClient(REMOTE_ADDR="10.46.0.6").get(url).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_a_search_over_the_cap_waits_for_a_slot_freed_within_the_wait(settings, monkeypatch):
    """A burst: the one search over the cap gets the slot the running one gives back 100 ms later, and answers 200
    instead of 503."""
    settings.SEARCH_MAX_CONCURRENT = 1
    version = searchkit.active_version()
    planted = searchkit.random_catalog(merchant=factories.merchant(), version=version, count=5)[0]
    url = f"/api/products/{planted.product.pk}/similar"
    entered = threading.Semaphore(0)
    real_similar = search.similar_products
    calls = []

    def slow_first(**kwargs):
        calls.append(1)
        if len(calls) == 1:
            entered.release()
            time.sleep(0.1)  # the running search, well within the waiting one's SEARCH_SLOT_WAIT_MS
        return real_similar(**kwargs)

    monkeypatch.setattr(search, "similar_products", slow_first)
    codes: list[int] = []

    def shopper(n: int) -> None:
        try:
            codes.append(APIClient(REMOTE_ADDR=f"10.47.0.{n}").get(url).status_code)
        finally:
            connection.close()

    first = threading.Thread(target=shopper, args=(1,))
    first.start()
    assert entered.acquire(timeout=30)
    second = APIClient(REMOTE_ADDR="10.47.0.2").get(url)
    first.join(timeout=30)

    assert second.status_code == 200
    assert codes == [200]


def _png():
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile("p.png", factories.png_bytes(size=(64, 64)))
