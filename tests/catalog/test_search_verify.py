"""The cascade's verify stage on the real PostgreSQL + pgvector: a look-alike that fc7 ranks first loses to the
product the photo really shows once local features are matched; the switch (request and setting) turns it off."""

import io
import json

import numpy as np
import pytest
from rest_framework.test import APIClient

from catalog import dispatch, geometry, query_payload, search
from catalog.models import ImageKeypoints
from catalog.query_payload import QueryEncoding
from catalog.search import SearchOptions
from catalog.services import embeddings
from tests import factories
from tests.catalog import searchkit
from tests.catalog.test_geometry import product_photo, warped

pytestmark = pytest.mark.django_db


@pytest.fixture
def wrong_by_fc7():
    """The shopper photographs product TRUE (tilted, smaller, on a surface); fc7 puts look-alike LOOK first and TRUE
    third, behind a random product. Every catalog image has its keypoints stored, as the embed worker leaves them."""
    version = searchkit.active_version()
    merchant = factories.merchant("shop")
    rng = np.random.default_rng(5)
    bits = searchkit.random_bits(rng)
    fc7 = searchkit.unit(rng.standard_normal(version.fc7_dim))
    noise = [searchkit.unit(rng.standard_normal(version.fc7_dim)) for _ in range(3)]

    def planted(sku: str, distance: float, seed: int):
        vector = searchkit.unit(fc7 + distance * noise[len(sku) % 3])
        row = searchkit.product_with_embeddings(merchant=merchant, version=version, sku=sku, encodings=[(bits, vector)])
        image = row.embeddings[0].image
        features = geometry.extract(product_photo(seed), side=geometry.CATALOG_SIDE)
        embeddings.keypoints_save(packed={image.pk: (geometry.pack(features), len(features))})
        return row.product

    look = planted("LOOK", 0.10, seed=21)
    other = planted("OTHERS", 0.20, seed=22)
    true = planted("TRUE", 0.30, seed=20)
    searchkit.random_catalog(merchant=merchant, version=version, count=20, seed=3)  # no keypoints stored for these
    query = QueryEncoding(
        model_version_id=version.pk,
        code=np.packbits(bits),
        fc7=fc7,
        keypoints=geometry.pack(geometry.extract(warped(product_photo(20), seed=1), side=geometry.QUERY_SIDE)),
    )
    return version, query, look, other, true


def ranked(result) -> list[int]:
    return [hit.product.pk for hit in result.hits]


def test_verification_puts_the_photographed_product_first(wrong_by_fc7):
    version, query, look, other, true = wrong_by_fc7

    unverified = search.search_encoding(encoding=query, version=version, options=SearchOptions(k=5, verify=False))
    verified = search.search_encoding(encoding=query, version=version, options=SearchOptions(k=5, verify=True))

    assert ranked(unverified)[:3] == [look.pk, other.pk, true.pk]
    assert "verify" not in unverified.timings_ms
    assert all(hit.explanation.inliers is None and hit.explanation.verify_factor == 1.0 for hit in unverified.hits)

    assert ranked(verified)[0] == true.pk
    assert set(ranked(verified)[1:3]) == {look.pk, other.pk}
    first = verified.hits[0]
    assert first.explanation.inliers >= 25 and first.explanation.tentative_matches >= first.explanation.inliers
    assert first.explanation.verify_factor == pytest.approx(search.verify_factor(first.explanation.inliers), abs=1e-6)
    assert first.score == pytest.approx(first.explanation.fine_score * first.explanation.verify_factor, abs=1e-5)
    assert first.explanation.fine_score == pytest.approx(unverified.hits[2].score, abs=1e-5)
    look_hit = next(hit for hit in verified.hits if hit.product.pk == look.pk)
    assert look_hit.explanation.inliers is not None and look_hit.explanation.inliers <= 8
    # Products whose images have no keypoints stored stay unverified; the scores stay sorted.
    assert any(hit.explanation.inliers is None for hit in verified.hits)
    assert [hit.score for hit in verified.hits] == sorted(hit.score for hit in verified.hits)
    assert verified.timings_ms["verify"] > 0


def test_the_setting_is_the_default_and_the_request_wins(wrong_by_fc7, settings):
    version, query, look, _, true = wrong_by_fc7

    settings.SEARCH_VERIFY = False
    assert ranked(search.search_encoding(encoding=query, version=version, options=SearchOptions(k=3)))[0] == look.pk
    on = search.search_encoding(encoding=query, version=version, options=SearchOptions(k=3, verify=True))
    assert ranked(on)[0] == true.pk

    settings.SEARCH_VERIFY = True
    assert ranked(search.search_encoding(encoding=query, version=version, options=SearchOptions(k=3)))[0] == true.pk
    settings.SEARCH_VERIFY_CANDIDATES = 2  # TRUE is third by fc7: beyond the verified candidates
    assert ranked(search.search_encoding(encoding=query, version=version, options=SearchOptions(k=3)))[0] == look.pk


def test_a_query_without_keypoints_is_searched_unverified(wrong_by_fc7):
    version, query, look, _, _ = wrong_by_fc7
    bare = QueryEncoding(model_version_id=version.pk, code=query.code, fc7=query.fc7)

    result = search.search_encoding(encoding=bare, version=version, options=SearchOptions(k=3, verify=True))

    assert ranked(result)[0] == look.pk and "verify" not in result.timings_ms


def test_the_search_api_switch_asks_the_worker_for_keypoints_and_shows_inliers(wrong_by_fc7, monkeypatch):
    version, query, look, _, true = wrong_by_fc7
    asked = []

    def encode_query(
        *, photo: bytes, version_id: int, keypoints: bool = False, item_weight: float = 0.0
    ) -> QueryEncoding:
        asked.append(keypoints)
        return query if keypoints else QueryEncoding(model_version_id=version_id, code=query.code, fc7=query.fc7)

    monkeypatch.setattr(dispatch, "encode_query", encode_query)
    client = APIClient(REMOTE_ADDR="10.45.0.7")

    def post(**fields):
        upload = io.BytesIO(factories.png_bytes(size=(64, 64)))
        upload.name = "photo.png"
        response = client.post("/api/search", {"image": upload, "k": 3, **fields})
        assert response.status_code == 200, response.content
        return response.json()

    default = post()
    off = post(verify="false")
    on = post(verify="true")

    assert asked == [True, False, True]
    assert default["results"][0]["product"]["id"] == true.pk == on["results"][0]["product"]["id"]
    assert off["results"][0]["product"]["id"] == look.pk
    why = on["results"][0]["explanation"]
    assert why["inliers"] >= 25 and 0.2 <= why["verify_factor"] < 1 and why["fine_score"] > on["results"][0]["score"]
    assert off["results"][0]["explanation"]["inliers"] is None and "verify" not in off["timings_ms"]
    assert "verify" in on["timings_ms"]


def test_similar_products_verifies_with_the_stored_keypoints(wrong_by_fc7):
    version, _, look, _, true = wrong_by_fc7
    stored = ImageKeypoints.objects.get(image__product=true)
    assert stored.features == len(geometry.unpack(stored.data))
    assert len(bytes(stored.data)) == 10 + 132 * stored.features  # header, then x, y and a descriptor per feature

    result = search.similar_products(product_id=true.pk, options=SearchOptions(k=3, verify=True))

    assert true.pk not in ranked(result) and "verify" in result.timings_ms


def test_the_query_payload_carries_the_keypoints_as_json_text():
    packed = geometry.pack(geometry.extract(product_photo(4), side=geometry.QUERY_SIDE))
    code = np.packbits(np.ones(8, bool))
    message = query_payload.encoding_to_message(
        QueryEncoding(model_version_id=1, code=code, fc7=np.zeros(2, np.float32), keypoints=packed)
    )
    assert json.loads(json.dumps(message))["keypoints"] == message["keypoints"]
    assert query_payload.encoding_from_message(message).keypoints == packed
    bare = query_payload.encoding_to_message(QueryEncoding(model_version_id=1, code=code, fc7=np.zeros(2)))
    assert query_payload.encoding_from_message(bare).keypoints is None


def test_unreadable_keypoints_leave_a_candidate_unverified_not_the_search_failed(wrong_by_fc7):
    version, query, look, _, true = wrong_by_fc7
    ImageKeypoints.objects.filter(image__product=true).update(data=b"KP\x09 not this format")

    result = search.search_encoding(encoding=query, version=version, options=SearchOptions(k=3, verify=True))

    assert ranked(result)[0] == look.pk
    assert next(hit for hit in result.hits if hit.product.pk == true.pk).explanation.inliers is None
    garbled = QueryEncoding(model_version_id=version.pk, code=query.code, fc7=query.fc7, keypoints=b"junk")
    assert ranked(search.search_encoding(encoding=garbled, version=version, options=SearchOptions(k=3)))[0] == look.pk
