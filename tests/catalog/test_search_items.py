"""The items in a shopper's photo through the search API: the boxes a search returns (query.item_boxes), the fusion of
the whole photo with its best box (item_fusion / SEARCH_ITEM_FUSION), both encoder paths, and the schema. Version 0
is fitted at its served 224 px on rendered products and read from its ONNX export, as a web process reads it."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image
from rest_framework.test import APIClient

from catalog import dispatch, query_encoder, search
from catalog.search import SearchOptions
from catalog.services import model_versions
from inference.localise import FUSE_MAX_AREA
from tests.catalog.fitted import fitted_version, png
from workers.ml.datasets.render import render_product

_addresses = itertools.count(1)
TILE = (300, 200, 200)  # where the product lies in the 640 x 480 photo: left, top, side


@pytest.fixture
def client() -> APIClient:
    return APIClient(REMOTE_ADDR=f"10.61.{next(_addresses) % 250}.{np.random.default_rng().integers(1, 250)}")


@pytest.fixture
def served(settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"search": "1000/min"}}
    return model_versions.model_version_activate(version=fitted_version(tmp_path, name="v0", input_size=224))


def _table_photo(seeds_and_tiles=((3, TILE),), size=(640, 480)) -> bytes:
    photo = Image.new("RGB", size, (200, 190, 170))
    for seed, (left, top, side) in seeds_and_tiles:
        photo.paste(render_product(seed, view=0).image.convert("RGB").resize((side, side)), (left, top))
    return png(photo)


def _search(client, photo: bytes, **form):
    response = client.post("/api/search", {"image": SimpleUploadedFile("shot.png", photo), "k": 3, **form})
    assert response.status_code == 200, response.content
    return response.json()


def _area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


@pytest.mark.django_db
def test_a_search_returns_the_item_boxes_and_fuses_the_best_one_by_default(client, served, settings):
    body = _search(client, _table_photo())
    items = body["query"]["item_boxes"]
    assert items and items[0]["score"] == 1.0 and all(0 < item["score"] <= 1 for item in items)
    best = items[0]["box"]
    assert 0 <= best[0] < best[2] <= 1 and 0 <= best[1] < best[3] <= 1
    left, top, side = TILE
    centre = ((left + side / 2) / 640, (top + side / 2) / 480)
    assert best[0] < centre[0] < best[2] and best[1] < centre[1] < best[3]  # on the product
    assert _area(best) < FUSE_MAX_AREA  # not the whole photo: the product is a small part of it
    assert body["query"]["item_fused"] is True  # SEARCH_ITEM_FUSION is 0.5: it won (docs/benchmarks.md)

    whole = _search(client, _table_photo(), item_fusion="0")  # a request wins
    assert whole["query"]["item_fused"] is False and whole["query"]["item_boxes"] == items
    settings.SEARCH_ITEM_FUSION = 0
    assert _search(client, _table_photo())["query"]["item_fused"] is False
    assert _search(client, _table_photo(), item_fusion="0.5")["query"]["item_fused"] is True


@pytest.mark.django_db
def test_with_the_shopper_s_box_the_boxes_are_of_the_whole_photo_and_nothing_is_fused(client, served):
    box = (0.4, 0.3, 0.9, 0.95)
    body = _search(client, _table_photo(), box=",".join(map(str, box)), item_fusion="1")
    assert body["query"]["item_fused"] is False  # the shopper's box is the item
    items = body["query"]["item_boxes"]
    assert items
    for item in items:  # found inside the crop, reported in the whole photo's fractions
        x0, y0, x1, y1 = item["box"]
        assert box[0] - 1e-6 <= x0 < x1 <= box[2] + 1e-6 and box[1] - 1e-6 <= y0 < y1 <= box[3] + 1e-6


@pytest.mark.django_db
def test_a_bad_fusion_weight_is_a_400_naming_it(client, served):
    response = client.post("/api/search", {"image": SimpleUploadedFile("shot.png", _table_photo()), "item_fusion": "2"})
    assert response.status_code == 400 and "item_fusion" in response.json()


@pytest.mark.django_db(transaction=True)  # the worker reads the version through its own connection
def test_the_worker_finds_the_same_items_and_fuses_the_same_way(served, celery_worker_on):
    photo = query_encoder.query_image(Image.open(io.BytesIO(_table_photo())).convert("RGB"))
    here = query_encoder.query_encode(image=photo, version=served, item_weight=0.5).encoding
    with celery_worker_on("search"):
        there = dispatch.encode_query(photo=png(photo), version_id=served.pk, item_weight=0.5)
    assert here.item_fused and there.item_fused
    assert np.allclose(np.asarray(here.item_boxes), np.asarray(there.item_boxes), atol=1e-3)
    assert here.code.tobytes() == there.code.tobytes() and np.allclose(here.fc7, there.fc7, atol=1e-5)


def test_similar_products_options_reject_a_weight_outside_0_1():
    with pytest.raises(ValueError, match="item_fusion"):
        SearchOptions(item_fusion=1.5)
    assert search.item_fusion_weight(SearchOptions(item_fusion=0.25)) == 0.25


def test_the_api_schema_describes_the_item_boxes_and_the_fusion_switch():
    schema = APIClient().get("/api/schema/", {"format": "json"}).json()
    components = schema["components"]["schemas"]
    query = components["QueryOutput"]["properties"]
    assert query["item_boxes"]["type"] == "array" and query["item_fused"]["type"] == "boolean"
    item = components[query["item_boxes"]["items"]["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert item["box"]["type"] == "array" and item["box"]["minItems"] == item["box"]["maxItems"] == 4
    assert item["score"]["type"] == "number"
    request = schema["paths"]["/api/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = components[request["$ref"].rsplit("/", 1)[-1]]["properties"]
    assert fields["item_fusion"]["maximum"] == 1 and fields["item_fusion"]["minimum"] == 0
