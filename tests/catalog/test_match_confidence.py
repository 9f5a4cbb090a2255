"""The calibrated "same product" confidence on each result: the version's golden-set calibration applied to the
served (fused) score, read once per process and again after a switch or a re-evaluation; null without one."""

import numpy as np
import pytest
from django.db import connection
from rest_framework.test import APIClient

from catalog import search
from catalog.api.search import SearchOutputSerializer
from catalog.models import ModelVersion
from catalog.search import QueryEncoding, SearchOptions
from catalog.services import golden
from tests import factories
from tests.catalog import searchkit

pytestmark = pytest.mark.django_db

# Knots as workers.pipelines.match_calibration writes them: score ascending, confidence non-increasing.
KNOTS = {"scores": [0.2, 0.6, 1.0, 1.4], "confidences": [0.95, 0.7, 0.3, 0.05], "ece": 0.04, "results": 400}


def _evaluated(version: ModelVersion, calibration: dict, *, at: str = "2026-01-01T00:00:00Z") -> ModelVersion:
    return golden.version_golden_record(
        version_id=version.pk, numbers={"r1": 0.5, "queries": 40, "calibration": calibration, "evaluated_at": at}
    )


def _shop(version: ModelVersion):
    merchant = factories.merchant("shop")
    searchkit.random_catalog(merchant=merchant, version=version, count=40, seed=3, images=2)
    rng = np.random.default_rng(5)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    planted = searchkit.product_with_embeddings(merchant=merchant, version=version, sku="P", encodings=[(bits, fc7)])
    query = QueryEncoding(model_version_id=version.pk, code=np.packbits(bits), fc7=fc7)
    return planted, query


def _served(query: QueryEncoding, k: int = 20) -> search.SearchResult:
    """The version exactly as a shopper's search reads it (search.version_serving), then the cascade."""
    return search.search_encoding(encoding=query, version=search.version_serving(), options=SearchOptions(k=k))


def test_a_calibrated_version_returns_confidences_monotone_in_the_fused_score():
    version = searchkit.active_version()
    _evaluated(version, KNOTS)
    planted, query = _shop(version)

    result = _served(query)

    scores = [hit.score for hit in result.hits]
    confidences = [hit.confidence for hit in result.hits]
    assert result.hits[0].product.pk == planted.product.pk and len(result.hits) == 20
    assert scores == sorted(scores) and len(set(scores)) > 5  # a spread of fused scores, best first
    assert all(c is not None for c in confidences)
    assert all(a >= b for a, b in zip(confidences, confidences[1:]))  # never more confident about a worse score
    assert confidences[0] > confidences[-1]
    for hit in result.hits:
        assert hit.confidence == pytest.approx(np.interp(hit.score, KNOTS["scores"], KNOTS["confidences"]), abs=1e-4)
        assert hit.match == ("exact match" if hit.confidence >= golden.EXACT_MATCH_CONFIDENCE else "similar")
    assert result.hits[0].match == "exact match"  # the planted twin: score 0, confidence 0.95

    rendered = SearchOutputSerializer(result).data["results"]
    assert [r["confidence"] for r in rendered] == confidences and rendered[0]["match"] == "exact match"


def test_an_uncalibrated_version_returns_null_rather_than_a_made_up_confidence():
    version = searchkit.active_version()
    _evaluated(version, {})  # evaluated on too few results to fit a calibration
    _, query = _shop(version)

    result = _served(query, k=5)

    assert [hit.confidence for hit in result.hits] == [None] * 5 and {hit.match for hit in result.hits} == {None}
    rendered = SearchOutputSerializer(result).data["results"]
    assert {r["confidence"] for r in rendered} == {None} and {r["match"] for r in rendered} == {None}


def test_the_calibration_is_read_again_after_a_re_evaluation_and_after_a_switch():
    version = searchkit.active_version()
    _, query = _shop(version)
    assert _served(query, k=1).hits[0].confidence is None  # never evaluated

    _evaluated(version, KNOTS)
    assert _served(query, k=1).hits[0].confidence == pytest.approx(0.95)  # the planted twin, score 0
    read_once = search._calibrations[version.pk]
    _served(query, k=1)
    assert search._calibrations[version.pk] is read_once  # kept: not read again for every search

    _evaluated(version, {**KNOTS, "confidences": [0.4, 0.3, 0.2, 0.1]}, at="2026-02-01T00:00:00Z")
    assert _served(query, k=1).hits[0].confidence == pytest.approx(0.4)
    assert _served(query, k=1).hits[0].match == "similar"

    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # CREATE INDEX refuses to run with deferred FK checks pending
    other = searchkit.active_version()  # the switch: a version this process has not read
    assert search.version_serving().pk == other.pk and search.version_calibration(search.version_serving()) is None


def test_similar_products_carry_no_confidence():
    """The calibration is fitted on shopper photos; a catalog photo of another product is not one."""
    version = searchkit.active_version()
    _evaluated(version, KNOTS)
    planted, _ = _shop(version)

    result = search.similar_products(product_id=planted.product.pk, options=SearchOptions(k=3))

    assert len(result.hits) == 3 and {(hit.confidence, hit.match) for hit in result.hits} == {(None, None)}


def test_the_api_schema_describes_the_confidence():
    schema = APIClient().get("/api/schema/", {"format": "json"}).json()
    hit = schema["components"]["schemas"]["HitOutput"]["properties"]
    assert hit["confidence"]["type"] == "number" and hit["confidence"]["nullable"] is True
    assert "golden set" in hit["confidence"]["description"]
    assert hit["match"]["nullable"] is True
