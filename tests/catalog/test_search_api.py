"""The shopper API: validation, errors a shopper can act on, rendering, throttling. (What web processes load, torch
never among it, is in test_import_boundaries.py.)"""

import itertools
import json
import logging

import numpy as np
import pytest
from rest_framework.test import APIClient

from catalog import search
from tests import factories
from tests.catalog import searchkit

pytestmark = pytest.mark.django_db
_addresses = itertools.count(1)


@pytest.fixture
def client() -> APIClient:
    """A client from its own address: throttle counters live in the shared Redis, one per client address."""
    return APIClient(REMOTE_ADDR=f"10.44.{next(_addresses) % 250}.{np.random.default_rng().integers(1, 250)}")


def test_an_invalid_image_gets_a_400_with_a_clear_message(client):
    searchkit.active_version()
    response = client.post("/api/search", {"image": _upload(b"this is not a picture", "photo.jpg")})
    assert response.status_code == 400
    assert response.json() == {"detail": "invalid image: the file is not an image (or is corrupt)"}

    # GIF is accepted (its first frame: test_intake.py); a format no phone or shop export produces is not.
    response = client.post("/api/search", {"image": _upload(_bmp_bytes(), "photo.bmp")})
    assert response.status_code == 400 and "unsupported image format BMP" in response.json()["detail"]


def test_a_bad_box_or_filter_gets_a_400_naming_the_field(client):
    response = client.post(
        "/api/search", {"image": _upload(factories.png_bytes(size=(64, 64)), "p.png"), "box": "0.5,0,0.2,1"}
    )
    assert response.status_code == 400 and "box" in response.json()
    response = client.post(
        "/api/search", {"image": _upload(factories.png_bytes(size=(64, 64)), "p.png"), "merchant": "nobody"}
    )
    assert response.status_code == 400 and response.json()["merchant"] == ["no merchant 'nobody'"]


def test_search_without_an_active_version_is_a_503(client):
    response = client.post("/api/search", {"image": _upload(factories.png_bytes(size=(64, 64)), "p.png")})
    assert response.status_code == 503 and "no model version is active" in response.json()["detail"]


def test_similar_products_renders_ranked_products_with_explanations_and_timings(client, settings):
    settings.SEARCH_COARSE_BACKEND = "sql"
    version = searchkit.active_version()
    merchant = factories.merchant("shop")
    rng = np.random.default_rng(1)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    start = searchkit.product_with_embeddings(merchant=merchant, version=version, sku="A", encodings=[(bits, fc7)])
    twin = searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="B", encodings=[(bits, fc7)], category="dress", price="12.50"
    )
    searchkit.random_catalog(merchant=merchant, version=version, count=10, seed=2)

    response = client.get(f"/api/products/{start.product.pk}/similar", {"k": 4})

    assert response.status_code == 200, response.content
    body = response.json()
    assert [hit["rank"] for hit in body["results"]] == [1, 2, 3, 4]
    first = body["results"][0]
    assert first["product"] == {
        "id": twin.product.pk, "sku": "B", "title": "Product B", "category": "dress", "attributes": [],
        "price": "12.50", "url": "", "merchant": "shop",
    }  # fmt: skip
    assert first["explanation"]["hamming_distance"] == 0 and first["image_url"].startswith("http://testserver/")
    assert first["explanation"]["result_landmark_box"] == [0.2, 0.3, 0.7, 0.8]
    assert body["coarse"]["backend"] == "sql" and body["model_version"]["id"] == version.pk
    assert set(body["timings_ms"]) >= {"coarse", "fine", "explain", "total"}

    assert client.get("/api/products/999999999/similar").status_code == 404
    assert client.get(f"/api/products/{start.product.pk}/similar", {"k": 0}).status_code == 400
    too_many = client.get(f"/api/products/{start.product.pk}/similar", {"expansion": search.MAX_EXPANSION + 1})
    assert too_many.status_code == 400 and "expansion" in too_many.json()
    expanded = client.get(f"/api/products/{start.product.pk}/similar", {"k": 4, "expansion": 2})
    assert expanded.status_code == 200 and expanded.json()["results"][0]["product"]["id"] == twin.product.pk


def test_a_search_slower_than_the_threshold_is_logged_with_its_stage_timings(client, settings, caplog):
    version = searchkit.active_version()
    planted = searchkit.random_catalog(merchant=factories.merchant(), version=version, count=5)[0]
    url = f"/api/products/{planted.product.pk}/similar"

    settings.SEARCH_SLOW_MS = 60_000  # nothing here takes a minute: nothing is logged
    with caplog.at_level(logging.WARNING, logger="catalog.api.search"):
        assert client.get(url).status_code == 200
    assert not [record for record in caplog.records if "slow search" in record.getMessage()]

    settings.SEARCH_SLOW_MS = 0  # every search is slower than 0 ms
    with caplog.at_level(logging.WARNING, logger="catalog.api.search"):
        body = client.get(url).json()
    [line] = [record.getMessage() for record in caplog.records if "slow search" in record.getMessage()]
    assert line.startswith("slow search: similar products took") and f"version {version.pk}" in line
    logged = json.loads(line[line.index("{") :])
    assert set(logged) == set(body["timings_ms"]) >= {"coarse", "fine", "explain", "total"}


def test_anonymous_callers_cannot_choose_the_coarse_backend(client, settings):
    """`backend=sql` with a price filter would scan every embedding: the public API ignores the field."""
    settings.SEARCH_COARSE_BACKEND = "memory"
    version = searchkit.active_version()
    planted = searchkit.random_catalog(merchant=factories.merchant(), version=version, count=3)[0]

    response = client.get(f"/api/products/{planted.product.pk}/similar", {"k": 2, "backend": "sql"})

    assert response.status_code == 200, response.content
    assert response.json()["coarse"]["backend"] == "memory"
    schema = client.get("/api/schema/", {"format": "json"}).json()
    search_form = schema["components"]["schemas"]["SearchInput"]["properties"]
    assert "backend" not in search_form and "image" in search_form
    similar = schema["paths"]["/api/products/{product_id}/similar"]["get"]["parameters"]
    assert "backend" not in {parameter["name"] for parameter in similar}


def test_search_is_throttled_per_client(client, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"search": "2/min"}}
    version = searchkit.active_version()
    planted = searchkit.random_catalog(merchant=factories.merchant(), version=version, count=3)[0]
    url = f"/api/products/{planted.product.pk}/similar"

    assert [client.get(url).status_code for _ in range(3)] == [200, 200, 429]
    assert "throttled" in client.get(url).json()["detail"].lower()


def _upload(data: bytes, name: str):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data)


def _bmp_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, format="BMP")
    return buffer.getvalue()
