"""Catalog writes: idempotent product upserts and image adds."""

from decimal import Decimal

import pytest

from catalog.intake import IntakeError
from catalog.models import Product, ProductImage
from catalog.services import products
from tests import factories

pytestmark = pytest.mark.django_db


def test_product_upsert_creates_then_changes_nothing_then_updates():
    merchant = factories.merchant()
    fields = dict(merchant=merchant, sku="S1", title="Dress", category="dress", attributes=["red", "red", "long"])
    first = products.product_upsert(**fields, price=Decimal("19.9"))
    assert first.created and first.changed and first.product.attributes == ["long", "red"]
    updated_at = first.product.updated_at

    again = products.product_upsert(**fields, price=Decimal("19.90"))
    assert not again.created and not again.changed
    assert Product.objects.get().updated_at == updated_at

    changed = products.product_upsert(**{**fields, "title": "Long dress"}, price=Decimal("19.90"))
    assert changed.changed and Product.objects.get().title == "Long dress"
    assert Product.objects.count() == 1


def test_image_add_is_idempotent_and_queues_embedding_once(django_capture_on_commit_callbacks):
    product = factories.product(factories.merchant())
    data = factories.png_bytes((1, 2, 3), size=(40, 40))
    with django_capture_on_commit_callbacks() as callbacks:
        first = products.image_add(product=product, data=data)
        again = products.image_add(product=product, data=data)
    assert first.created and not again.created and first.image.pk == again.image.pk
    assert ProductImage.objects.count() == 1
    assert len(callbacks) == 1  # one embed task, for the one new image
    assert first.image.file.read()[:4] == b"\x89PNG"


def test_image_add_rejects_bad_input_and_stores_nothing():
    product = factories.product(factories.merchant())
    with pytest.raises(IntakeError):
        products.image_add(product=product, data=b"GIF89a....")
    assert ProductImage.objects.count() == 0
