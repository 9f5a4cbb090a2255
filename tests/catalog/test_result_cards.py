"""The fine stage's result cards kept in each web process (catalog.hamming.cards): the same results as PostgreSQL
ranking the same candidates, no query once cached, and every change of what a card shows visible to the next
search (migration 0013's triggers, written by queryset updates so that no model code runs)."""

from decimal import Decimal

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from catalog import hamming, search
from catalog.hamming.candidates import CandidateDepth, ProductFilter
from catalog.hamming.cards import CardCache
from catalog.models import ImageEmbedding, Merchant, Product, ProductImage
from catalog.search import QueryEncoding, SearchOptions
from tests import factories
from tests.catalog import searchkit
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db


@pytest.fixture
def shop():
    hamming.MEMORY_INDEX.clear()
    version = searchkit.active_version()
    merchant = factories.merchant("cards")
    catalog = searchkit.random_catalog(merchant=merchant, version=version, count=80, seed=4, images=2, category="hat")
    yield version, merchant, catalog
    hamming.MEMORY_INDEX.clear()


def _candidates(version, bits):
    return hamming.MEMORY_INDEX.candidates(
        version_id=version.pk, code_bits=version.code_bits, code=np.packbits(bits),
        depth=CandidateDepth(min_count=100, max_count=400), product_filter=ProductFilter(),
    )  # fmt: skip


def _rows(rows):
    return [(r.product, r.embedding_id, r.image_id, r.image_file, r.hamming, r.landmarks) for r in rows]


def test_cached_cards_rank_and_read_as_postgresql_does_and_need_no_query(shop, monkeypatch):
    version, _, _ = shop
    rng = np.random.default_rng(5)
    for trial in range(6):
        bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
        candidates = _candidates(version, bits)
        k = int(rng.choice([1, 5, 30]))
        cold = search.fine_rank(candidates=candidates, version=version, fc7=fc7, product_filter=ProductFilter(), k=k)
        with CaptureQueriesContext(connection) as queries:
            warm = search.fine_rank(
                candidates=candidates, version=version, fc7=fc7, product_filter=ProductFilter(), k=k
            )
        assert len(queries) == 0, (trial, [q["sql"][:80] for q in queries])
        with monkeypatch.context() as patched:
            patched.setattr(hamming.MEMORY_INDEX, "fc7_rank", lambda **_: None)  # -> pgvector ranks them
            in_sql = search.fine_rank(
                candidates=candidates, version=version, fc7=fc7, product_filter=ProductFilter(), k=k
            )
        assert len(warm) == len(in_sql) == k, trial
        assert _rows(cold) == _rows(warm) == _rows(in_sql), trial
        assert np.allclose([r.score for r in warm], [r.score for r in in_sql], atol=1e-5), trial


def _first_hit(version, bits, fc7):
    query = QueryEncoding(model_version_id=version.pk, code=np.packbits(bits), fc7=np.asarray(fc7, np.float32))
    result = search.search_encoding(encoding=query, version=version, options=SearchOptions(backend="memory", k=3))
    return result.hits[0]


def _eventually(probe, accept):
    last = []

    def accepted() -> bool:
        last[:] = [probe()]
        return accept(last[0])

    wait_until(accepted, timeout=1.0, interval=0.02, message=lambda: f"not within 1 s: {last[0]}")
    return last[0]


def test_every_change_of_a_card_shows_in_the_next_search(shop):
    version, merchant, _ = shop
    rng = np.random.default_rng(6)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    planted = searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="CARD", encodings=[(bits, fc7)], price="10.00"
    )
    product = planted.product
    probe = lambda: _first_hit(version, bits, fc7)  # noqa: E731
    hit = _eventually(probe, lambda hit: hit.product.pk == product.pk)
    assert hit.product.title == product.title and len(hamming.MEMORY_INDEX.cards) > 0

    Product.objects.filter(pk=product.pk).update(title="Renamed", price=Decimal("12.50"), url="https://x.test/p")
    hit = _eventually(probe, lambda hit: hit.product.title == "Renamed")
    assert hit.product.price == Decimal("12.50") and hit.product.url == "https://x.test/p"

    Product.objects.filter(pk=product.pk).update(attributes=["wool"], category="scarf", sku="CARD-2")
    hit = _eventually(probe, lambda hit: hit.product.sku == "CARD-2")
    assert hit.product.category == "scarf" and hit.product.attributes == ["wool"]

    ProductImage.objects.filter(pk=planted.embeddings[0].image_id).update(file="products/moved.png")
    hit = _eventually(probe, lambda hit: hit.image_url.endswith("products/moved.png"))

    ImageEmbedding.objects.filter(pk=planted.embeddings[0].pk).update(landmarks=[[0.1, 0.1, 1.0]])
    hit = _eventually(probe, lambda hit: hit.explanation.result_landmarks == [[0.1, 0.1, 1.0]])

    Merchant.objects.filter(pk=merchant.pk).update(slug="renamed-shop")
    hit = _eventually(probe, lambda hit: hit.product.merchant_slug == "renamed-shop")

    other = factories.merchant("other-shop")
    Product.objects.filter(pk=product.pk).update(merchant=other)
    hit = _eventually(probe, lambda hit: hit.product.merchant_id == other.pk)
    assert hit.product.merchant_slug == "other-shop"


def test_a_card_read_before_a_change_is_not_kept():
    """A search that missed a card reads it from PostgreSQL; if the index replayed a change of it meanwhile, the
    card it read may be the old one, so it is not kept."""
    cache = CardCache(capacity=10)
    _, token = cache.get([1, 2, 3])
    cache.forget(product_ids=[20])
    cache.put({1: (10, "one"), 2: (20, "two (maybe stale)"), 3: (30, "three")}, token=token)
    found, token = cache.get([1, 2, 3])
    assert found == {1: "one", 3: "three"}

    cache.forget(embedding_ids=[3])
    cache.put({3: (30, "three, old")}, token=token)
    assert cache.get([3])[0] == {}

    _, token = cache.get([4])
    cache.clear()
    cache.put({4: (40, "four")}, token=token)
    assert cache.get([4])[0] == {}

    _, token = cache.get([5])
    for _ in range(100):  # more changes than are remembered: which cards they concern is unknown
        cache.forget(embedding_ids=[999])
    cache.put({5: (50, "five")}, token=token)
    assert cache.get([5])[0] == {}


def test_the_cache_is_bounded_and_forgets_a_products_cards():
    cache = CardCache(capacity=3)
    _, token = cache.get([])
    cache.put({1: (10, "a"), 2: (10, "b"), 3: (30, "c")}, token=token)
    cache.get([1])  # used: the least recently used is now 2
    cache.put({4: (40, "d")}, token=token)
    assert set(cache.get([1, 2, 3, 4])[0]) == {1, 3, 4}
    cache.forget(product_ids=[10])
    assert set(cache.get([1, 2, 3, 4])[0]) == {3, 4}
    assert len(CardCache(capacity=0).get([1])[0]) == 0


def test_a_reload_of_the_index_drops_the_cards(shop):
    version, _, catalog = shop
    rng = np.random.default_rng(7)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    search.fine_rank(candidates=_candidates(version, bits), version=version, fc7=fc7, product_filter=ProductFilter(),
                     k=10)  # fmt: skip
    assert len(hamming.MEMORY_INDEX.cards) >= 10
    # A change the index never replays (as when changes were pruned while it slept), then a reload:
    with connection.cursor() as cursor:
        cursor.execute("UPDATE catalog_product SET title = 'Unseen' WHERE id = %s", [catalog[0].product.pk])
        cursor.execute("DELETE FROM catalog_indexchange")
    hamming.MEMORY_INDEX._load(version_id=version.pk, code_bits=version.code_bits)
    cards, _ = hamming.MEMORY_INDEX.result_cards([e.pk for p in catalog for e in p.embeddings])
    assert cards == {}


def test_rows_from_the_coarse_stage_are_used_only_while_they_hold_the_same_embeddings(shop):
    """fc7_rank takes the coarse stage's row positions instead of looking each id up; positions that no longer hold
    those embeddings (a compaction or reload since) are looked up again, with the same answer."""
    version, _, _ = shop
    rng = np.random.default_rng(8)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    candidates = _candidates(version, bits)
    assert candidates.rows is not None and len(candidates.rows) == len(candidates)

    def ranked(hint):
        found = hamming.MEMORY_INDEX.fc7_rank(
            version_id=version.pk, embedding_ids=candidates.embedding_ids, fc7=fc7, rows_hint=hint
        )
        return found.product_ids.tolist(), found.embedding_ids.tolist(), found.positions.tolist()

    looked_up = ranked(None)
    assert ranked(candidates.rows) == looked_up
    assert ranked(candidates.rows[::-1].copy()) == looked_up  # moved rows
    assert ranked(candidates.rows + 10**7) == looked_up  # rows past the arrays' end
    assert candidates.distances[looked_up[2]].tolist() == [
        int(candidates.distances[list(candidates.embedding_ids).index(e)]) for e in looked_up[1]
    ]
