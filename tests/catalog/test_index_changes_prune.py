"""Pruning the change log never leaves an in-memory index stale: one that missed pruned changes reloads."""

from datetime import timedelta

import numpy as np
import pytest

from catalog.hamming.memory import MemoryCodeIndex
from catalog.models import IndexChange, ModelVersion
from catalog.services import maintenance
from tests import factories

pytestmark = pytest.mark.django_db(transaction=True)


def test_prune_deletes_only_old_changes():
    product = factories.product(factories.merchant())
    product.active = False
    product.save()
    assert IndexChange.objects.count() == 1
    assert maintenance.index_changes_prune() == 0  # younger than the retention
    assert maintenance.index_changes_prune(older_than=timedelta(0)) == 1
    assert IndexChange.objects.count() == 0


def test_an_index_that_slept_through_a_prune_reloads_instead_of_missing_a_deletion():
    version = ModelVersion.objects.create(name="v", code_bits=8, fc7_dim=2, status=ModelVersion.Status.ACTIVE)
    merchant = factories.merchant()
    kept, doomed = factories.product(merchant, sku="kept"), factories.product(merchant, sku="doomed")
    for product in (kept, doomed):
        image = factories.image(product, product.sku)
        factories.embedding(image=image, model_version=version, bits=np.ones(8, bool), fc7=np.zeros(2))

    index = MemoryCodeIndex()
    index.refresh(version_id=version.pk, code_bits=8, force=True)
    assert index.stats().rows == 2 and index.stats().full_loads == 1

    doomed.delete()  # the index does not poll now ...
    maintenance.index_changes_prune(older_than=timedelta(0))  # ... and the deletion's change is pruned
    kept.title = "still here"
    kept.active = False
    kept.save()
    kept.active = True
    kept.save()  # newer changes exist, the deletion's does not

    index.refresh(version_id=version.pk, code_bits=8, force=True)
    assert index.stats().full_loads == 2
    assert index.stats().rows == 1
