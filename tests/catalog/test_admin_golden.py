"""Golden queries (real shopper photos of known products) are added by staff in the admin and seen only by staff:
the photos are stored outside the published media, validated and stripped like any query photo."""

import io

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from catalog.models import GoldenQuery, ModelVersion
from catalog.services import golden
from tests import factories

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/catalog/goldenquery/"


def _jpeg_with_exif() -> bytes:
    image = Image.new("RGB", (40, 40), (10, 120, 200))
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make: stands in for the GPS block a phone writes
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


@pytest.fixture
def staff_client(client):
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    return client


def test_staff_add_a_golden_query_in_the_admin_and_its_photo_is_private_and_stripped(staff_client):
    product = factories.product(factories.merchant())
    upload = SimpleUploadedFile("shopper.jpg", _jpeg_with_exif(), content_type="image/jpeg")
    response = staff_client.post(f"{CHANGELIST}add/", {"product": product.pk, "photo": upload, "source": "admin"})
    assert response.status_code == 302, response.content.decode()[:2000]
    query = GoldenQuery.objects.get()
    assert query.product == product and query.source == GoldenQuery.Source.ADMIN
    stored = query.photo.path
    assert stored.startswith(str(settings.PRIVATE_MEDIA_ROOT)) and not stored.startswith(str(settings.MEDIA_ROOT))
    with query.photo.open("rb") as handle:
        assert not Image.open(handle).getexif()  # re-encoded: nothing the phone wrote survives
    listing = staff_client.get(CHANGELIST).content.decode()
    photo_url = f"{CHANGELIST}{query.pk}/photo/"
    assert photo_url in listing
    assert staff_client.get(photo_url).status_code == 200


def test_a_file_that_is_not_an_image_is_refused(staff_client):
    product = factories.product(factories.merchant())
    upload = SimpleUploadedFile("shopper.jpg", b"not an image", content_type="image/jpeg")
    response = staff_client.post(f"{CHANGELIST}add/", {"product": product.pk, "photo": upload, "source": "admin"})
    assert response.status_code == 200 and not GoldenQuery.objects.exists()


def test_golden_queries_are_visible_to_staff_only(client):
    product = factories.product(factories.merchant())
    query = golden.golden_query_add(product=product, photo=_jpeg_with_exif())
    photo_url = f"{CHANGELIST}{query.pk}/photo/"
    for who in (None, "shopper", "merchant"):
        client.logout()
        if who is not None:
            user = get_user_model().objects.create_user(who, password="pw")
            if who == "merchant":
                product.merchant.users.add(user)
            client.force_login(user)
        for url in (CHANGELIST, f"{CHANGELIST}{query.pk}/change/", photo_url):
            response = client.get(url)
            assert response.status_code == 302 and "/admin/login/" in response["Location"], (who, url)
    # and no public URL reaches the file: it is not under the published media
    assert not query.photo.path.startswith(str(settings.MEDIA_ROOT))


def test_staff_without_the_view_permission_do_not_see_the_photos(client):
    product = factories.product(factories.merchant())
    query = golden.golden_query_add(product=product, photo=_jpeg_with_exif())
    client.force_login(get_user_model().objects.create_user("clerk", password="pw", is_staff=True))
    assert client.get(f"{CHANGELIST}{query.pk}/photo/").status_code == 403
    assert client.get(CHANGELIST).status_code == 403


def test_the_version_page_shows_its_golden_numbers(staff_client):
    version = ModelVersion.objects.create(name="v1", checkpoint="v1.pt", status=ModelVersion.Status.READY)
    numbers = {
        "queries": 200, "r1": 0.415, "r10": 0.8, "map10": 0.52, "coarse_recall": 0.97, "final_recall": 0.8,
        "encode_ms_p50": 12.0, "encode_ms_p95": 20.0, "by_source": {"heldout": {"queries": 200, "r1": 0.415}},
    }  # fmt: skip
    golden.version_golden_record(version_id=version.pk, numbers=numbers)
    assert "41.5%" in staff_client.get("/admin/catalog/modelversion/").content.decode()
    page = staff_client.get(f"/admin/catalog/modelversion/{version.pk}/change/").content.decode()
    assert "R@1" in page and "41.5%" in page and "source heldout" in page and "97.0%" in page
