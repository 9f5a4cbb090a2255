"""manage.py keypoints_backfill: images embedded before geometric verification get their keypoints, once."""

import io

import pytest
from django.core.files.base import ContentFile
from django.core.management import call_command

from catalog import geometry
from catalog.models import ImageKeypoints, ProductImage
from tests import factories
from tests.catalog.test_geometry import product_photo

pytestmark = pytest.mark.django_db


def test_images_without_keypoints_get_them_and_others_are_left_alone():
    product = factories.product(factories.merchant())
    buffer = io.BytesIO()
    product_photo(1).save(buffer, format="PNG")
    photo = ProductImage(product=product, sha256="1" * 64, status=ProductImage.Status.EMBEDDED)
    photo.file.save("photo.png", ContentFile(buffer.getvalue()), save=True)
    plain = factories.image(product, "plain")  # one colour: no keypoints at all, still stored (as zero features)
    done = factories.image(product, "done")
    ImageKeypoints.objects.create(image=done, data=b"kept", features=0)

    call_command("keypoints_backfill", stdout=io.StringIO())

    stored = {row.image_id: row for row in ImageKeypoints.objects.all()}
    assert set(stored) == {photo.pk, plain.pk, done.pk}
    assert stored[photo.pk].features == len(geometry.unpack(stored[photo.pk].data)) > 20
    assert stored[plain.pk].features == 0 and bytes(stored[done.pk].data) == b"kept"
