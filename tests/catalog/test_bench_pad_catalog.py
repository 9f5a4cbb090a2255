"""bench_pad_catalog: synthetic look-alikes of the active version's embeddings, loaded by the memory index as a web
process loads them, ranked like any product, and removed again."""

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from catalog import hamming, search
from catalog.models import ImageEmbedding, Product
from catalog.search import QueryEncoding, SearchOptions
from tests import factories
from tests.catalog import searchkit

pytestmark = pytest.mark.django_db(transaction=True)  # (CREATE INDEX refuses pending FK trigger events)


def test_padding_adds_searchable_look_alikes_and_removes_them():
    version = searchkit.active_version()
    real = searchkit.random_catalog(merchant=factories.merchant("real"), version=version, count=5, seed=2)
    with pytest.raises(CommandError):
        call_command("bench_pad_catalog", products=10)  # not without --yes

    call_command("bench_pad_catalog", products=300, yes=True)
    assert Product.objects.filter(merchant__slug="bench-pad").count() == 300
    padded = ImageEmbedding.objects.filter(product__merchant__slug="bench-pad", model_version=version)
    assert padded.count() == 300

    hamming.MEMORY_INDEX.clear()
    embedding = real[0].embeddings[0]
    query = QueryEncoding(
        model_version_id=version.pk, code=searchkit_code(embedding), fc7=np.asarray(embedding.fc7, np.float32)
    )
    result = search.search_encoding(encoding=query, version=version, options=SearchOptions(backend="memory", k=20))
    assert hamming.MEMORY_INDEX.stats().rows == 305
    assert result.hits[0].product.pk == real[0].product.pk
    assert any(hit.product.merchant_slug == "bench-pad" for hit in result.hits)
    in_sql = search.search_encoding(encoding=query, version=version, options=SearchOptions(backend="sql", k=20))
    assert [h.product.pk for h in in_sql.hits][:5] == [h.product.pk for h in result.hits][:5]

    call_command("bench_pad_catalog", remove=True, yes=True)
    assert not Product.objects.filter(merchant__slug="bench-pad").exists()
    assert ImageEmbedding.objects.filter(model_version=version).count() == 5
    hamming.MEMORY_INDEX.clear()


def searchkit_code(embedding) -> np.ndarray:
    from catalog.codes import bitstring_pack

    return bitstring_pack(str(embedding.code))


def test_padding_drops_the_hnsw_index_and_removing_builds_it_again():
    from django.db import connection

    from catalog.codes import code_index_name

    version = searchkit.active_version()
    searchkit.random_catalog(merchant=factories.merchant("real2"), version=version, count=3, seed=3)

    def has_index() -> bool:
        with connection.cursor() as cursor:
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL", [code_index_name(version_id=version.pk)])
            return cursor.fetchone()[0]

    assert has_index()
    call_command("bench_pad_catalog", products=20, yes=True)
    assert not has_index()
    call_command("bench_pad_catalog", remove=True, yes=True)
    assert has_index()
