"""α query expansion in the fine stage (catalog.search.expanded_query), on a small constructed catalog in the real
PostgreSQL + pgvector, through both coarse backends (the memory index's fc7 and PostgreSQL's)."""

import numpy as np
import pytest

from catalog import search
from catalog.hamming.candidates import ProductFilter
from catalog.search import QueryEncoding, SearchOptions
from tests import factories
from tests.catalog import searchkit

pytestmark = pytest.mark.django_db
BACKENDS = ["memory", "sql"]


def axis(index: int, dim: int = searchkit.FC7_DIM) -> np.ndarray:
    vector = np.zeros(dim, np.float32)
    vector[index] = 1.0
    return vector


@pytest.fixture
def shop():
    """The query looks along e0. NEIGHBOUR is nearest; DISTRACTOR (leaning to e2) is nearer than TARGET (leaning to
    e1, as NEIGHBOUR does), so expanding the query with NEIGHBOUR lifts TARGET above DISTRACTOR. NEIGHBOUR has a
    second, far image that expansion must not use (a product counts by its best image). SHOE, another category, is
    the very nearest and leans to e2: where a filter leaves it out, it must not steer the expansion either."""
    version = searchkit.active_version()
    merchant = factories.merchant("shop")
    rng = np.random.default_rng(3)
    searchkit.random_catalog(merchant=merchant, version=version, count=20, seed=5, category="dress")

    def plant(sku: str, *vectors: np.ndarray, category: str = "dress"):
        encodings = [(searchkit.random_bits(rng), searchkit.unit(v)) for v in vectors]
        return searchkit.product_with_embeddings(
            merchant=merchant, version=version, sku=sku, encodings=encodings, category=category
        ).product.pk

    planted = {
        "neighbour": plant("NEIGHBOUR", -axis(0), axis(0) + 0.2 * axis(1)),
        "target": plant("TARGET", axis(0) + 0.6 * axis(1)),
        "distractor": plant("DISTRACTOR", axis(0) + 0.55 * axis(2)),
        "shoe": plant("SHOE", axis(0) + 0.1 * axis(2), category="shoe"),
    }
    query = QueryEncoding(
        model_version_id=version.pk, code=np.packbits(searchkit.random_bits(rng)), fc7=np.asarray(axis(0))
    )
    return version, query, planted


def run(version, query, backend, **options):
    return search.search_encoding(
        encoding=query, version=version, options=SearchOptions(k=4, backend=backend, verify=False, **options)
    )


def ranked(result, planted) -> list[str]:
    names = {pk: name for name, pk in planted.items()}
    return [names.get(hit.product.pk, "other") for hit in result.hits]


DRESSES = ProductFilter(category="dress")


@pytest.mark.parametrize("backend", BACKENDS)
def test_expansion_reranks_the_candidates_for_the_weighted_mean_of_query_and_neighbours(shop, backend):
    version, query, planted = shop

    plain = run(version, query, backend, product_filter=DRESSES)
    expanded = run(version, query, backend, product_filter=DRESSES, expansion=1, expansion_alpha=2.0)

    assert ranked(plain, planted)[:3] == ["neighbour", "distractor", "target"]
    assert ranked(expanded, planted)[:3] == ["neighbour", "target", "distractor"]
    # The distances are to the expanded query as specified: q + cos(q, n)^alpha * n (n: NEIGHBOUR's best image),
    # normalised to the query's norm.
    neighbour = searchkit.unit(axis(0) + 0.2 * axis(1))
    expected = searchkit.unit(axis(0) + float(neighbour @ axis(0)) ** 2.0 * neighbour)
    target = searchkit.unit(axis(0) + 0.6 * axis(1))
    assert expanded.hits[1].explanation.fc7_distance == pytest.approx(np.linalg.norm(target - expected), abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_expansion_is_the_plain_search(shop, backend, settings):
    version, query, planted = shop
    settings.SEARCH_QUERY_EXPANSION = 3  # the option beats the setting

    plain = run(version, query, backend, expansion=0)
    settings.SEARCH_QUERY_EXPANSION = 0
    default = run(version, query, backend)

    for result in (plain, default):
        assert ranked(result, planted)[:3] == ["shoe", "neighbour", "distractor"]
    assert [(hit.product.pk, hit.score) for hit in plain.hits] == [(hit.product.pk, hit.score) for hit in default.hits]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_setting_turns_expansion_on_and_filters_still_hold(shop, backend, settings):
    version, query, planted = shop
    settings.SEARCH_QUERY_EXPANSION = 1
    settings.SEARCH_QUERY_EXPANSION_ALPHA = 2.0

    filtered = run(version, query, backend, product_filter=DRESSES)
    unfiltered = run(version, query, backend)

    # Filtered: SHOE is neither shown nor used, so NEIGHBOUR steers the query to TARGET.
    assert "shoe" not in ranked(filtered, planted)
    assert ranked(filtered, planted)[:3] == ["neighbour", "target", "distractor"]
    assert all(hit.product.category == "dress" for hit in filtered.hits)
    # Unfiltered: SHOE is the first neighbour and pulls the query towards DISTRACTOR.
    assert ranked(unfiltered, planted)[:3] == ["shoe", "neighbour", "distractor"]
    assert len({hit.product.pk for hit in unfiltered.hits}) == len(unfiltered.hits) == 4


def test_expansion_out_of_range_is_refused():
    with pytest.raises(ValueError):
        SearchOptions(expansion=search.MAX_EXPANSION + 1)
    with pytest.raises(ValueError):
        SearchOptions(expansion=-1)
