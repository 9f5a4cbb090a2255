"""A product the merchant deactivates or deletes through the API disappears from search at once, on both coarse
backends (the in-memory index follows the IndexChange rows the database triggers write)."""

import numpy as np
import pytest
from django.urls import reverse

from catalog import search
from catalog.codes import bitstring_pack
from tests import factories
from tests.catalog import searchkit

pytestmark = pytest.mark.django_db

BACKENDS = ("memory", "sql")


def _hits(version, embedding, backend: str) -> list[str]:
    encoding = search.QueryEncoding(
        model_version_id=version.pk,
        code=bitstring_pack(str(embedding.code)),
        fc7=np.asarray(embedding.fc7, np.float32),
    )
    result = search.search_encoding(
        encoding=encoding, version=version, options=search.SearchOptions(k=5, backend=backend)
    )
    return [hit.product.sku for hit in result.hits]


def test_deactivated_or_deleted_products_disappear_from_search_immediately(merchant_client):
    merchant = factories.merchant("gamma")
    client = merchant_client(merchant=merchant)
    version = searchkit.active_version()
    planted = searchkit.random_catalog(merchant=merchant, version=version, count=8, seed=3)
    target, other = planted[0], planted[1]
    query, other_query = target.embeddings[0], other.embeddings[0]
    for backend in BACKENDS:
        assert _hits(version, query, backend)[0] == target.product.sku

    url = reverse("api:merchant-product-detail", args=[target.product.pk])
    assert client.patch(url, {"active": False}, format="json").status_code == 200
    for backend in BACKENDS:
        assert target.product.sku not in _hits(version, query, backend)

    assert client.patch(url, {"active": True}, format="json").status_code == 200
    for backend in BACKENDS:
        assert _hits(version, query, backend)[0] == target.product.sku

    other_url = reverse("api:merchant-product-detail", args=[other.product.pk])
    assert client.delete(other_url).status_code == 204
    for backend in BACKENDS:
        assert other.product.sku not in _hits(version, other_query, backend)
        assert _hits(version, query, backend)[0] == target.product.sku
