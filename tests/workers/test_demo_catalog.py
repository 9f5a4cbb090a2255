"""The sample shop loader: Fashion-MNIST and rendered products through the services, idempotent, with a clear
fallback when Fashion-MNIST is missing. (Waiting for the worker is covered by the e2e tests and `make demo`.)"""

import io

import numpy as np
import pytest
from django.core.management import call_command

from catalog.models import Merchant, ModelVersion, Product, ProductImage
from tests.ml.ml_helpers import write_idx
from workers import sample_shop

pytestmark = pytest.mark.django_db


@pytest.fixture
def tiny_fashion_mnist(tmp_path):
    rng = np.random.default_rng(0)
    images = np.zeros((4, 28, 28), np.uint8)
    for index in range(4):
        x0, y0 = rng.integers(2, 10, 2)
        images[index, y0 : y0 + 14, x0 : x0 + 12] = rng.integers(60, 250)
        images[index, y0 : y0 + 4, x0 : x0 + 3] = 255  # a corner mark: no photo equals its mirror image
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 3, 8, 9], np.uint8))
    return tmp_path


def _load(**options) -> str:
    out = io.StringIO()
    call_command("demo_catalog", no_wait=True, stdout=out, stderr=out, **options)
    return out.getvalue()


def test_loads_both_kinds_with_several_photos_each_and_a_second_run_adds_nothing(tiny_fashion_mnist):
    first = _load(products=5, fashion_mnist_dir=tiny_fashion_mnist)

    assert "3 Fashion-MNIST products (t10k) and 2 rendered products" in first
    assert Product.objects.count() == 5
    assert ProductImage.objects.count() == 5 * sample_shop.PHOTOS_PER_PRODUCT  # the toy shapes are not symmetric
    fashion = Product.objects.get(sku="FM-00001")
    assert fashion.category == "dress" and fashion.price is not None and fashion.attributes[0].startswith("tone:")
    rendered = Product.objects.filter(merchant__slug=sample_shop.RENDER_MERCHANT[0]).first()
    assert rendered is not None and rendered.attributes and rendered.title
    assert ModelVersion.objects.get().status == ModelVersion.Status.TRAINING  # version 0 is on its way

    second = _load(products=5, fashion_mnist_dir=tiny_fashion_mnist)

    assert "added 0 products and 0 images (5 already there)" in second
    assert Product.objects.count() == 5 and ProductImage.objects.count() == 15
    assert ModelVersion.objects.count() == 1


def test_without_fashion_mnist_it_warns_and_renders_everything(tmp_path):
    output = _load(products=3, fashion_mnist_dir=tmp_path)

    assert "Fashion-MNIST is unavailable" in output and "rendered products only" in output
    assert set(Merchant.objects.values_list("products__merchant__slug", flat=True)) >= {"render-studio"}
    assert Product.objects.filter(merchant__slug="render-studio").count() == 3
