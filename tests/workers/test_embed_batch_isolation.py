"""One image the network cannot encode (or a stored file that no longer decodes) is marked failed; the rest of
its batch is embedded. Before, one bad image failed the whole batch of up to 64 and the sweeper re-queued it
forever."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from django.core.files.base import ContentFile

from catalog.models import ImageEmbedding, ProductImage
from tests import factories
from tests.catalog import searchkit
from workers import pipelines

pytestmark = pytest.mark.django_db
POISON = (1, 2, 3)  # the colour of the image the fake network chokes on


class ChokingEncoder:
    """Encodes like a network (one row per image, in order) but raises on any batch holding a POISON picture."""

    label_space = SimpleNamespace(categories=(), attributes=())

    def __init__(self, code_bits: int, fc7_dim: int) -> None:
        self.code_bits, self.fc7_dim, self.calls = code_bits, fc7_dim, []

    def encode(self, images):
        self.calls.append(len(images))
        if any(picture.getpixel((0, 0)) == POISON for picture in images):
            raise ValueError("the network cannot encode this picture")
        rng = np.random.default_rng(len(images))
        fc7 = rng.standard_normal((len(images), self.fc7_dim)).astype(np.float32)
        return SimpleNamespace(
            bits=rng.integers(0, 2, (len(images), self.code_bits)).astype(bool),
            fc7=fc7 / np.linalg.norm(fc7, axis=1, keepdims=True),
            category_probs=None,
            attribute_probs=None,
            landmarks=None,
            visibility=None,
        )


def test_a_failed_image_is_marked_failed_and_the_rest_of_its_batch_is_embedded(monkeypatch):
    version = searchkit.active_version()
    encoder = ChokingEncoder(version.code_bits, version.fc7_dim)
    monkeypatch.setattr(pipelines, "encoder_of", lambda _version: encoder)
    product = factories.product(factories.merchant())
    good = [factories.image(product, f"good-{n}", color=(10 * n, 100, 200)) for n in range(5)]
    poison = factories.image(product, "poison", color=POISON)
    broken = factories.image(product, "broken", color=(9, 9, 9))
    broken.file.save("broken.png", ContentFile(b"\x89PNG\r\n\x1a\n truncated"), save=True)  # no longer decodes
    ids = [image.pk for image in [good[0], poison, *good[1:], broken]]

    result = pipelines.images_embed(image_ids=ids)

    assert (result["embedded"], result["failed"]) == (5, 2)
    assert encoder.calls == [6, 1, 1, 1, 1, 1, 1]  # the batch whole, then one by one
    status = dict(ProductImage.objects.filter(pk__in=ids).values_list("pk", "status"))
    assert {status[image.pk] for image in good} == {"embedded"}
    assert status[poison.pk] == status[broken.pk] == "failed"
    assert (
        "could not be encoded: the network cannot encode this picture" in ProductImage.objects.get(pk=poison.pk).error
    )
    embedded = set(ImageEmbedding.objects.filter(model_version=version).values_list("image_id", flat=True))
    assert embedded == {image.pk for image in good}
