"""The cascade on the real PostgreSQL + pgvector, through both coarse backends (embeddings written directly)."""

from decimal import Decimal

import numpy as np
import pytest
from django.db import connection

from catalog import hamming, search
from catalog.codes import bitstring_pack
from catalog.hamming import sql as hamming_sql
from catalog.hamming.candidates import CandidateDepth, ProductFilter
from catalog.models import ImageEmbedding, Product
from catalog.search import QueryEncoding, SearchOptions
from tests import factories
from tests.catalog import searchkit
from tests.waiting import wait_until
from workers.ml.codes import select_shells

pytestmark = pytest.mark.django_db
BACKENDS = ["memory", "sql"]


def query_for(version, bits, fc7, **fields) -> QueryEncoding:
    return QueryEncoding(
        model_version_id=version.pk, code=np.packbits(np.asarray(bits, bool)), fc7=np.asarray(fc7, np.float32), **fields
    )


def run(version, query, backend, **options):
    return search.search_encoding(encoding=query, version=version, options=SearchOptions(backend=backend, **options))


def product_ids(result) -> list[int]:
    return [hit.product.pk for hit in result.hits]


@pytest.fixture
def shop():
    version = searchkit.active_version()
    merchant = factories.merchant("shop")
    searchkit.random_catalog(merchant=merchant, version=version, count=60, seed=1, images=2, category="dress")
    return version, merchant


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_planted_item_comes_first(shop, backend):
    version, merchant = shop
    rng = np.random.default_rng(7)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    planted = searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="PLANT", encodings=[(bits, fc7)]
    )

    result = run(version, query_for(version, bits, fc7), backend, k=5)

    assert result.hits[0].product.pk == planted.product.pk
    assert result.hits[0].explanation.hamming_distance == 0
    assert result.hits[0].explanation.fc7_distance == pytest.approx(0, abs=1e-5)
    assert len(result.hits) == 5 and result.coarse.backend == backend
    assert set(result.timings_ms) >= {"coarse", "fine", "explain", "total"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_product_appears_once_ranked_by_its_best_image(shop, backend):
    version, merchant = shop
    rng = np.random.default_rng(8)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    near = searchkit.unit(fc7 + 0.05 * rng.standard_normal(version.fc7_dim))
    far = searchkit.unit(-fc7)
    many = searchkit.product_with_embeddings(
        merchant=merchant,
        version=version,
        sku="MANY",
        encodings=[(~bits, far), (searchkit.flip(bits, [1]), near), (bits, fc7)],  # best image last on purpose
    )
    runner_up = searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="NEAR", encodings=[(searchkit.flip(bits, [2]), near)]
    )

    result = run(version, query_for(version, bits, fc7), backend, k=10)

    ids = product_ids(result)
    assert len(ids) == len(set(ids)) == 10
    assert ids[:2] == [many.product.pk, runner_up.product.pk]
    assert result.hits[0].embedding_id == many.embeddings[2].pk


@pytest.mark.parametrize("backend", BACKENDS)
def test_deleted_and_inactive_products_never_appear(shop, backend):
    version, merchant = shop
    rng = np.random.default_rng(9)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    hidden = searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="HIDDEN", encodings=[(bits, fc7)], active=False
    )
    doomed = searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="DOOMED", encodings=[(bits, fc7)]
    )
    query = query_for(version, bits, fc7)
    assert product_ids(run(version, query, backend, k=5))[0] == doomed.product.pk

    Product.objects.filter(pk=doomed.product.pk).delete()
    ids = _eventually(lambda: product_ids(run(version, query, backend, k=60)), lambda ids: doomed.product.pk not in ids)
    assert hidden.product.pk not in ids and doomed.product.pk not in ids and len(ids) == 60


def _eventually(probe, accept, within_s: float = 1.0):
    """`probe()`'s value once `accept` holds for it; the in-memory index promises changes within 1 s."""
    last = []

    def accepted() -> bool:
        last[:] = [probe()]
        return accept(last[0])

    wait_until(accepted, timeout=within_s, interval=0.02, message=lambda: f"not within {within_s} s: {last[0]}")
    return last[0]


def test_memory_index_follows_the_change_log_without_reloading(shop):
    version, merchant = shop
    rng = np.random.default_rng(10)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    query = query_for(version, bits, fc7)
    run(version, query, "memory")  # load
    loads = hamming.MEMORY_INDEX.stats().full_loads

    added = searchkit.product_with_embeddings(merchant=merchant, version=version, sku="NEW", encodings=[(bits, fc7)])
    _eventually(lambda: product_ids(run(version, query, "memory", k=3)), lambda ids: ids[0] == added.product.pk)

    Product.objects.filter(pk=added.product.pk).update(active=False)  # queryset update: no model code runs
    _eventually(lambda: product_ids(run(version, query, "memory", k=3)), lambda ids: added.product.pk not in ids)

    Product.objects.filter(pk=added.product.pk).update(active=True)
    _eventually(lambda: product_ids(run(version, query, "memory", k=3)), lambda ids: ids[0] == added.product.pk)

    # An updated code moves the image: far away now, so the product is no longer first.
    factories.embedding(image=added.embeddings[0].image, model_version=version, bits=~bits, fc7=-fc7)
    _eventually(lambda: product_ids(run(version, query, "memory", k=3)), lambda ids: added.product.pk not in ids)

    added.embeddings[0].delete()

    def rows() -> int:
        hamming.MEMORY_INDEX.refresh(version_id=version.pk, code_bits=version.code_bits)
        return hamming.MEMORY_INDEX.stats().rows

    _eventually(rows, lambda count: count == 120)
    assert hamming.MEMORY_INDEX.stats().full_loads == loads


def test_memory_index_reloads_when_the_active_version_changes(shop):
    version, merchant = shop
    rng = np.random.default_rng(11)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    run(version, query_for(version, bits, fc7), "memory")
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # CREATE INDEX refuses to run with deferred FK checks pending
    newer = searchkit.active_version(code_bits=64, fc7_dim=8)
    bits64, fc7_8 = searchkit.random_bits(rng, 64), searchkit.unit(rng.standard_normal(8))
    planted = searchkit.product_with_embeddings(merchant=merchant, version=newer, sku="V2", encodings=[(bits64, fc7_8)])

    result = run(newer, query_for(newer, bits64, fc7_8), "memory", k=5)

    assert product_ids(result) == [planted.product.pk]  # only products embedded by the new version exist
    assert hamming.MEMORY_INDEX.stats().version_id == newer.pk


@pytest.mark.parametrize("backend", BACKENDS)
def test_filters_are_respected(shop, backend):
    version, merchant = shop
    rng = np.random.default_rng(12)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    near = [
        (searchkit.flip(bits, [i]), searchkit.unit(fc7 + 0.1 * rng.standard_normal(version.fc7_dim))) for i in range(3)
    ]
    bag = searchkit.product_with_embeddings(
        merchant=merchant,
        version=version,
        sku="BAG",
        encodings=[near[0]],
        category="bag",
        attributes=("red", "leather"),
    )
    cheap_bag = searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="CHEAPBAG", encodings=[near[1]], category="bag", attributes=("red",),
        price="3.00",
    )  # fmt: skip
    searchkit.random_catalog(merchant=merchant, version=version, count=30, seed=3, category="bag", price="99.00")
    query = query_for(version, bits, fc7)

    by_category = run(version, query, backend, k=50, product_filter=ProductFilter(category="bag"))
    assert {hit.product.category for hit in by_category.hits} == {"bag"} and len(by_category.hits) == 32

    by_attributes = run(version, query, backend, k=5, product_filter=ProductFilter(attributes=("leather", "red")))
    assert product_ids(by_attributes) == [bag.product.pk]

    priced = run(
        version, query, backend, k=5, product_filter=ProductFilter(price_min=Decimal("1"), price_max=Decimal("5"))
    )
    assert product_ids(priced) == [cheap_bag.product.pk]

    everything_in_range = run(version, query, backend, k=100, product_filter=ProductFilter(price_min=Decimal("50")))
    assert {hit.product.price for hit in everything_in_range.hits} == {Decimal("99.00")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_merchant_scoping(shop, backend):
    version, merchant = shop
    other = factories.merchant("other")
    rng = np.random.default_rng(13)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    theirs = searchkit.product_with_embeddings(merchant=other, version=version, sku="EXACT", encodings=[(bits, fc7)])
    query = query_for(version, bits, fc7)

    scoped = run(version, query, backend, k=20, product_filter=ProductFilter(merchant_id=merchant.pk))
    assert theirs.product.pk not in product_ids(scoped)
    assert {hit.product.merchant_id for hit in scoped.hits} == {merchant.pk} and len(scoped.hits) == 20

    only_theirs = run(version, query, backend, k=20, product_filter=ProductFilter(merchant_id=other.pk))
    assert product_ids(only_theirs) == [theirs.product.pk]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_are_taken_as_whole_shells(shop, backend):
    version, merchant = shop
    rng = np.random.default_rng(14)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    tied = [
        searchkit.product_with_embeddings(
            merchant=merchant, version=version, sku=f"TIE{i}", encodings=[(searchkit.flip(bits, [i]), fc7)]
        )
        for i in range(5)
    ]  # five images at Hamming distance 1, nothing at 0
    backend_ = hamming.backend_get(backend)
    code = np.packbits(bits)

    got = backend_.candidates(
        version_id=version.pk, code_bits=version.code_bits, code=code, depth=CandidateDepth(min_count=3,
        max_count=100), product_filter=ProductFilter(),
    )  # fmt: skip
    tied_ids = {planted.embeddings[0].pk for planted in tied}
    assert set(got.embedding_ids[:5].tolist()) == tied_ids  # all five, not the first three of a tie
    assert got.radius >= 1 and list(got.distances) == sorted(got.distances)
    assert np.all(got.distances[got.distances == got.radius].size + (got.distances < got.radius).sum() == len(got))

    capped = backend_.candidates(
        version_id=version.pk, code_bits=version.code_bits, code=code, depth=CandidateDepth(min_count=7,
        max_count=7), product_filter=ProductFilter(),
    )  # fmt: skip
    everything = {e.pk: np.unpackbits(bitstring_pack(str(e.code))) for e in ImageEmbedding.objects.all()}
    ids = np.asarray(list(everything))
    distances = np.asarray([int((bits_ != bits).sum()) for bits_ in everything.values()])
    reference = select_shells(distances, min_count=7, max_count=7)  # the numpy reference in workers.ml.codes
    assert set(capped.embedding_ids.tolist()) == set(ids[reference.indices].tolist()) >= tied_ids

    within = backend_.candidates(
        version_id=version.pk, code_bits=version.code_bits, code=code, depth=CandidateDepth(min_count=50,
        max_count=100, radius=1), product_filter=ProductFilter(),
    )  # fmt: skip
    assert set(within.embedding_ids.tolist()) == tied_ids and within.radius == 1


def test_both_backends_agree_on_a_small_catalog(shop):
    version, merchant = shop
    rng = np.random.default_rng(15)
    for trial in range(5):
        bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
        query = query_for(version, bits, fc7)
        memory, sql = run(version, query, "memory", k=15), run(version, query, "sql", k=15)
        assert product_ids(memory) == product_ids(sql), trial
        assert [h.explanation.hamming_distance for h in memory.hits] == [
            h.explanation.hamming_distance for h in sql.hits
        ]


def test_sql_backend_never_returns_fewer_than_asked(shop, monkeypatch):
    """A LIMIT beyond what the HNSW walk yields silently returns fewer rows; the backend must notice."""
    version, merchant = shop
    monkeypatch.setattr(hamming_sql, "HNSW_EF_SEARCH_MAX", 3)
    monkeypatch.setattr(hamming_sql, "HNSW_EF_SEARCH_MIN", 3)
    monkeypatch.setattr(hamming_sql, "HNSW_MAX_SCAN_TUPLES", 1)
    rng = np.random.default_rng(16)
    code = np.packbits(searchkit.random_bits(rng))
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # make the planner walk the index even on a tiny table
    try:
        got = hamming.SQL_INDEX.candidates(
            version_id=version.pk,
            code_bits=version.code_bits,
            code=code,
            depth=CandidateDepth(min_count=120, max_count=1000),
            product_filter=ProductFilter(merchant_id=merchant.pk),
        )
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET enable_seqscan")
    assert len(got) == 120 and got.exhaustive  # every image of the catalog: there are only 120
    assert any("exact scan" in note for note in got.notes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_filters_that_starve_the_candidates_widen_the_coarse_stage(shop, backend, monkeypatch):
    version, merchant = shop
    monkeypatch.setattr(search, "COARSE_MIN_CANDIDATES", 4)
    monkeypatch.setattr(search, "COARSE_CANDIDATES_PER_RESULT", 1)
    monkeypatch.setattr(search, "COARSE_MAX_CANDIDATES", 4)
    rng = np.random.default_rng(17)
    rare = searchkit.random_catalog(merchant=merchant, version=version, count=3, seed=4, category="hat")
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))

    result = run(version, query_for(version, bits, fc7), backend, k=3, product_filter=ProductFilter(category="hat"))

    assert sorted(product_ids(result)) == sorted(p.product.pk for p in rare)
    # SQL filters inside the coarse query (one round); memory cannot see categories, widens, then hands over to SQL.
    assert result.coarse.backend == "sql" and (result.coarse.rounds == 1) == (backend == "sql")


@pytest.mark.parametrize("mode", ["boost", "restrict", "off"])
def test_the_predicted_category_boosts_or_restricts(mode):
    version = searchkit.active_version()
    merchant = factories.merchant()
    rng = np.random.default_rng(18)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    closer = searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="COAT", category="coat",
        encodings=[(bits, searchkit.unit(fc7 + 0.10 * searchkit.unit(rng.standard_normal(version.fc7_dim))))],
    )  # fmt: skip
    dress = searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="DRESS", category="dress",
        encodings=[(bits, searchkit.unit(fc7 + 0.11 * searchkit.unit(rng.standard_normal(version.fc7_dim))))],
    )  # fmt: skip
    query = query_for(version, bits, fc7, category="dress", category_confidence=0.9)

    ids = product_ids(run(version, query, "memory", k=5, category_mode=mode))

    expected = {
        "off": [closer.product.pk, dress.product.pk],
        "boost": [dress.product.pk, closer.product.pk],
        "restrict": [dress.product.pk],
    }[mode]
    if mode == "off":
        assert set(ids) == set(expected)  # by fc7 alone (whichever is nearer)
    else:
        assert ids == expected


def test_explanation_reports_agreement_and_landmark_boxes(shop):
    version, merchant = shop
    rng = np.random.default_rng(19)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="EXPL", encodings=[(searchkit.flip(bits, [0, 1]), fc7)],
        category="dress", attributes=("red", "long"),
    )  # fmt: skip
    query = query_for(
        version, bits, fc7, category="dress", category_confidence=0.8, attributes={"red": 0.9, "short": 0.7},
        landmarks=[[0.1, 0.2, 0.9], [0.6, 0.9, 0.8], [0.99, 0.99, 0.1]],
    )  # fmt: skip

    why = run(version, query, "memory", k=1).hits[0].explanation

    assert why.hamming_distance == 2 and why.code_bits == version.code_bits
    assert why.category_agrees is True and why.category_catalog == "dress"
    assert why.attributes_agreeing == ["red"]
    assert why.query_landmark_box == [0.1, 0.2, 0.6, 0.9]  # the invisible third landmark is left out
    assert why.result_landmark_box == [0.2, 0.3, 0.7, 0.8]


def test_similar_products_leaves_out_the_product_itself(shop):
    version, merchant = shop
    rng = np.random.default_rng(20)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    start = searchkit.product_with_embeddings(merchant=merchant, version=version, sku="START", encodings=[(bits, fc7)])
    twin = searchkit.product_with_embeddings(
        merchant=merchant, version=version, sku="TWIN", encodings=[(searchkit.flip(bits, [3]), fc7)]
    )

    result = search.similar_products(product_id=start.product.pk, options=SearchOptions(k=5))

    assert product_ids(result)[0] == twin.product.pk and start.product.pk not in product_ids(result)
    with pytest.raises(search.ProductNotSearchable):
        search.similar_products(product_id=10**9, options=SearchOptions())


def test_the_fine_stage_ranks_the_same_in_memory_and_in_postgresql(shop, monkeypatch):
    """fc7 held in the memory index (distances and best image per product computed in this process, filters and
    boost applied in one card query) ranks exactly as pgvector over the same candidates."""
    version, merchant = shop
    searchkit.random_catalog(merchant=merchant, version=version, count=30, seed=7, images=3, category="coat",
                             attributes=("red",), price="99.00")  # fmt: skip
    rng = np.random.default_rng(21)
    cases = [
        dict(product_filter=ProductFilter(), boost=0.0),
        dict(product_filter=ProductFilter(category="coat"), boost=0.0),
        dict(product_filter=ProductFilter(attributes=("red",), price_max=Decimal("100")), boost=0.0),
        dict(product_filter=ProductFilter(price_max=Decimal("50")), boost=0.0),
        dict(product_filter=ProductFilter(), boost=0.15, boost_category="coat"),
        dict(product_filter=ProductFilter(merchant_id=merchant.pk, exclude_product_id=None), boost=0.1,
             boost_category="dress"),
    ]  # fmt: skip
    for trial, case in enumerate(cases * 2):
        bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
        candidates = hamming.MEMORY_INDEX.candidates(
            version_id=version.pk, code_bits=version.code_bits, code=np.packbits(bits),
            depth=CandidateDepth(min_count=150, max_count=400), product_filter=case["product_filter"],
        )  # fmt: skip
        k = int(rng.choice([1, 5, 40]))
        assert hamming.MEMORY_INDEX.fc7_rank(version_id=version.pk, embedding_ids=candidates.embedding_ids, fc7=fc7)
        in_memory = search.fine_rank(candidates=candidates, version=version, fc7=fc7, k=k, **case)
        with monkeypatch.context() as patched:
            patched.setattr(hamming.MEMORY_INDEX, "fc7_rank", lambda **_: None)  # -> pgvector computes them
            in_sql = search.fine_rank(candidates=candidates, version=version, fc7=fc7, k=k, **case)
        assert len(in_memory) == len(in_sql) > 0, trial
        assert [(r.product.pk, r.embedding_id, r.hamming) for r in in_memory] == [
            (r.product.pk, r.embedding_id, r.hamming) for r in in_sql
        ], trial
        assert np.allclose([r.score for r in in_memory], [r.score for r in in_sql], atol=1e-5), trial
        assert in_memory[0].product == in_sql[0].product


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.timeout(60)
def test_a_radius_past_the_code_length_with_hidden_rows_ends_with_every_visible_product(backend):
    """Found by schemathesis (tests/catalog/test_openapi_fuzz.py): the memory index parks hidden rows (here: the
    product itself) at code_bits + 1, so a radius past that counted them as reachable, the coarse stage never said
    "exhaustive", and the cascade widened forever: an anonymous `?radius=1023` held a web thread at 100% CPU."""
    version = searchkit.active_version()
    merchant = factories.merchant("few")
    catalog = searchkit.random_catalog(merchant=merchant, version=version, count=4, seed=3)
    start = catalog[0].product.pk

    for radius in (version.code_bits + 1, 1023):
        options = SearchOptions(k=10, radius=radius, backend=backend)
        result = search.similar_products(product_id=start, options=options)
        assert sorted(product_ids(result)) == sorted(p.product.pk for p in catalog[1:])
        assert result.coarse.rounds <= search.COARSE_WIDEN_ROUNDS + 2


def test_without_fc7_in_memory_the_fine_stage_reads_postgresql(shop, settings):
    version, merchant = shop
    rng = np.random.default_rng(22)
    bits, fc7 = searchkit.random_bits(rng), searchkit.unit(rng.standard_normal(version.fc7_dim))
    query = query_for(version, bits, fc7)
    with_fc7 = run(version, query, "memory", k=10)
    assert hamming.MEMORY_INDEX._rows.fc7_dim == version.fc7_dim  # fc7 held beside the codes

    settings.SEARCH_FC7_IN_MEMORY = False
    hamming.MEMORY_INDEX.clear()
    without = run(version, query, "memory", k=10)

    assert hamming.MEMORY_INDEX._rows.fc7_dim == 0
    assert hamming.MEMORY_INDEX.fc7_rank(version_id=version.pk, embedding_ids=np.arange(3), fc7=fc7) is None
    assert product_ids(without) == product_ids(with_fc7)
    assert [h.explanation.fc7_distance for h in without.hits] == pytest.approx(
        [h.explanation.fc7_distance for h in with_fc7.hits], abs=1e-5
    )
    hamming.MEMORY_INDEX.clear()  # the next test's index holds fc7 again


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_depth_with_a_share_takes_that_share_of_the_rows_the_query_may_see(backend):
    """CandidateDepth.share against a real catalog: the backend raises min_count to the share of the rows the query
    can see (the merchant's, when the query is for one shop), whole shells, never past max_count."""
    version = searchkit.active_version()
    shop, other = factories.merchant("shop"), factories.merchant("other")
    searchkit.random_catalog(merchant=shop, version=version, count=150, seed=31, images=2)
    searchkit.random_catalog(merchant=other, version=version, count=250, seed=32)
    code = np.packbits(searchkit.random_bits(np.random.default_rng(33)))

    def candidates(depth, **filters):
        return hamming.backend_get(backend).candidates(
            version_id=version.pk, code_bits=version.code_bits, code=code, depth=depth,
            product_filter=ProductFilter(**filters),
        )  # fmt: skip

    share = CandidateDepth(min_count=10, max_count=1_000, share=0.25)
    in_the_shop = candidates(share, merchant_id=shop.pk)  # 300 images of this shop: a quarter is 75
    everywhere = candidates(share)  # 550 images in all: 138
    capped = candidates(CandidateDepth(min_count=10, max_count=100, share=0.5))
    floor = candidates(CandidateDepth(min_count=200, max_count=1_000, share=0.01), merchant_id=shop.pk)

    assert 75 <= len(in_the_shop) < 138
    shop_ids = set(ImageEmbedding.objects.filter(product__merchant=shop).values_list("id", flat=True))
    assert set(in_the_shop.embedding_ids.tolist()) <= shop_ids
    assert len(everywhere) >= 138
    assert len(capped) <= 100
    assert len(floor) >= 200


def test_the_default_depth_passes_at_most_five_percent_of_a_10k_shop():
    """The rule chosen on bench_coarse's validation split (docs/benchmarks.md, "Coarse depth")."""
    depth = search.candidate_depth(k=search.DEFAULT_K)
    assert depth.for_rows(10_000).min_count <= 0.05 * 10_000  # whole shells add a few: bench_coarse measures it
    assert depth.for_rows(1_000).min_count >= search.DEFAULT_K * search.COARSE_CANDIDATES_PER_RESULT
    assert depth.for_rows(10_000_000).min_count == depth.max_count  # huge shops: the cap, not a share
