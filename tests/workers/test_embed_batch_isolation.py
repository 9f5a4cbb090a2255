"""One image the network cannot encode (or a stored file that no longer decodes) is marked failed; the rest of
its batch is embedded. Before, one bad image failed the whole batch of up to 64 and the sweeper re-queued it
forever."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from django.core.files.base import ContentFile
from PIL import Image

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


def test_a_batch_stores_each_images_own_vectors_and_keypoints_whatever_thread_extracted_them(monkeypatch):
    """The keypoints are extracted on a helper thread while the embeddings are written: each image still gets its
    own code, fc7 and local features (those of its own working copy), and an image that already has keypoints
    keeps them."""
    from catalog import geometry, selectors
    from catalog.codes import bits_to_bitstring
    from catalog.models import ImageKeypoints

    version = searchkit.active_version()
    encoder = ChokingEncoder(version.code_bits, version.fc7_dim)
    monkeypatch.setattr(pipelines, "encoder_of", lambda _version: encoder)
    product = factories.product(factories.merchant())
    images = [factories.image(product, f"img-{n}", color=(20 * n, 40, 255 - 20 * n)) for n in range(7)]
    ImageKeypoints.objects.create(image=images[3], data=b"kept", features=0)  # stored before: not replaced
    ids = [image.pk for image in images]

    result = pipelines.images_embed(image_ids=ids)

    assert (result["embedded"], result["failed"]) == (7, 0)
    order = [image.pk for image in selectors.images_by_id(image_ids=ids)]  # the batch's order, as encoded
    blank = Image.new("RGB", (1, 1))
    expected = ChokingEncoder(version.code_bits, version.fc7_dim).encode([blank] * 7)  # depends on the size only
    stored = {row.image_id: row for row in ImageEmbedding.objects.filter(model_version=version)}
    for index, image_id in enumerate(order):
        assert stored[image_id].code == bits_to_bitstring(expected.bits[index])
        assert np.array_equal(np.asarray(stored[image_id].fc7, np.float32), expected.fc7[index])
    for image in images:
        features = ImageKeypoints.objects.get(image=image)
        if image == images[3]:
            assert bytes(features.data) == b"kept"
        else:
            own = geometry.extract(selectors.image_open(image=image), side=geometry.CATALOG_SIDE)
            assert bytes(features.data) == geometry.pack(own) and features.features == len(own)
    assert set(ProductImage.objects.filter(pk__in=ids).values_list("status", flat=True)) == {"embedded"}
