"""A shopper's "this is the one" on a result (POST /api/search/confirm): the photo joins the shop's golden set only
with the shopper's consent and only where the shop keeps shoppers' photos; it is kept for the shop's retention
(the maintenance sweep deletes older ones with their files), validated like a search photo, seen by staff only,
and throttled."""

import itertools
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils import timezone
from PIL import Image
from rest_framework.test import APIClient

from catalog.models import GoldenQuery, Merchant
from catalog.services import golden, maintenance
from tests import factories

pytestmark = pytest.mark.django_db
URL = "/api/search/confirm"
_addresses = itertools.count(1)


@pytest.fixture
def client() -> APIClient:
    """A client from its own address: throttle counters live in the shared Redis, one per client address."""
    return APIClient(REMOTE_ADDR=f"10.55.{next(_addresses) % 250}.{np.random.default_rng().integers(1, 250)}")


@pytest.fixture
def private_root() -> Path:
    """Where staff-only files are stored (the storage is bound when the model loads, so not a tmp_path)."""
    return Path(GoldenQuery._meta.get_field("photo").storage.location)


def _shop(*, keeps: bool, slug: str = "acme", retention_days: int = 30):
    merchant = factories.merchant(slug)
    Merchant.objects.filter(pk=merchant.pk).update(
        golden_from_shoppers=keeps, shopper_photo_retention_days=retention_days
    )
    return factories.product(merchant, sku=f"{slug}-1")


def _photo(size=(80, 60)) -> SimpleUploadedFile:
    return SimpleUploadedFile("me.png", factories.png_bytes(size=size), content_type="image/png")


def _stored_files(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()} if root.exists() else set()


def test_with_consent_where_the_shop_allows_it_the_photo_joins_the_golden_set(client, private_root):
    product = _shop(keeps=True)

    response = client.post(URL, {"image": _photo(), "product": product.pk, "consent": "true", "box": "0,0,0.5,0.5"})

    assert response.status_code == 201, response.content
    query = GoldenQuery.objects.get()
    assert query.product == product and query.source == GoldenQuery.Source.SHOPPER and query.consented_at
    assert Path(query.photo.path).parent.is_relative_to(private_root)
    with query.photo.open("rb") as handle:
        assert Image.open(handle).size == (40, 30)  # the box the shopper searched with
    assert "id" not in response.json()  # nothing about stored photos goes back to an anonymous caller


@pytest.mark.parametrize("consent", [None, "false"])
def test_without_consent_it_is_a_400_and_nothing_is_stored(client, private_root, consent):
    product = _shop(keeps=True)
    form = {"image": _photo(), "product": product.pk, **({"consent": consent} if consent else {})}
    before = _stored_files(private_root)

    response = client.post(URL, form)

    assert response.status_code == 400 and "consent" in response.json()
    assert not GoldenQuery.objects.exists() and _stored_files(private_root) == before
    with pytest.raises(ValueError, match="consent"):  # the service refuses too, whoever calls it
        golden.golden_query_from_shopper(product_id=product.pk, photo=factories.png_bytes(), consent=False)


def test_a_shop_that_does_not_keep_shoppers_photos_refuses(client, private_root):
    product = _shop(keeps=False)  # the default
    before = _stored_files(private_root)

    response = client.post(URL, {"image": _photo(), "product": product.pk, "consent": "true"})

    assert response.status_code == 403 and "does not keep shoppers' photos" in response.json()["detail"]
    assert not GoldenQuery.objects.exists() and _stored_files(private_root) == before
    assert Merchant._meta.get_field("golden_from_shoppers").default is False


def test_the_photo_is_validated_like_a_search_photo(client, private_root):
    product = _shop(keeps=True)
    before = _stored_files(private_root)
    not_a_picture = SimpleUploadedFile("me.png", b"definitely not an image", content_type="image/png")

    response = client.post(URL, {"image": not_a_picture, "product": product.pk, "consent": "true"})
    assert response.status_code == 400 and response.json()["detail"].startswith("invalid image")
    hidden = factories.product(product.merchant, sku="hidden", active=False)
    response = client.post(URL, {"image": _photo(), "product": hidden.pk, "consent": "true"})
    assert response.status_code == 404
    assert not GoldenQuery.objects.exists() and _stored_files(private_root) == before


def test_confirming_is_throttled_per_client(client, private_root, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"confirm": "2/min"}}
    product = _shop(keeps=True)

    codes = [client.post(URL, {"image": _photo(), "product": product.pk, "consent": "true"}).status_code
             for _ in range(3)]  # fmt: skip

    assert codes == [201, 201, 429] and GoldenQuery.objects.count() == 2


def test_retention_deletes_expired_shopper_photos_and_their_files(private_root):
    kept_for_30 = _shop(keeps=True, slug="thirty", retention_days=30)
    stopped = _shop(keeps=True, slug="stopped", retention_days=365)

    def shopper_photo(product, age_days: int) -> GoldenQuery:
        query = golden.golden_query_from_shopper(product_id=product.pk, photo=factories.png_bytes(), consent=True)
        GoldenQuery.objects.filter(pk=query.pk).update(created_at=timezone.now() - timedelta(days=age_days))
        return query

    old, recent = shopper_photo(kept_for_30, 31), shopper_photo(kept_for_30, 29)
    by_staff = golden.golden_query_add(product=kept_for_30, photo=factories.png_bytes())  # staff's: no retention
    GoldenQuery.objects.filter(pk=by_staff.pk).update(created_at=timezone.now() - timedelta(days=400))
    of_a_shop_that_stopped = shopper_photo(stopped, 1)
    Merchant.objects.filter(slug="stopped").update(golden_from_shoppers=False)
    files = {query.pk: Path(query.photo.path) for query in (old, recent, by_staff, of_a_shop_that_stopped)}
    assert all(path.exists() for path in files.values())

    assert maintenance.shopper_photos_expire() == 2

    assert set(GoldenQuery.objects.values_list("pk", flat=True)) == {recent.pk, by_staff.pk}
    assert {pk for pk, path in files.items() if path.exists()} == {recent.pk, by_staff.pk}
    assert maintenance.shopper_photos_expire() == 0


def test_the_media_sweep_deletes_shopper_photo_files_whose_rows_are_gone(private_root):
    product = _shop(keeps=True)
    kept = golden.golden_query_from_shopper(product_id=product.pk, photo=factories.png_bytes(), consent=True)
    gone = golden.golden_query_from_shopper(product_id=product.pk, photo=factories.png_bytes(), consent=True)
    gone_file = Path(gone.photo.path)
    GoldenQuery.objects.filter(pk=gone.pk).delete()  # Django deletes the row, never the file

    maintenance.golden_orphans_delete(min_age_s=0)

    assert Path(kept.photo.path).exists() and not gone_file.exists()


def test_anonymous_and_non_staff_cannot_see_shopper_photos(client, private_root):
    product = _shop(keeps=True)
    assert client.post(URL, {"image": _photo(), "product": product.pk, "consent": "true"}).status_code == 201
    query = GoldenQuery.objects.get()
    photo_url = f"/admin/catalog/goldenquery/{query.pk}/photo/"

    anonymous = Client()
    assert anonymous.get(photo_url).status_code == 302  # to the admin login
    assert anonymous.get("/admin/catalog/goldenquery/").status_code == 302
    assert anonymous.get(f"/media/{query.photo.name}").status_code == 404  # never under the published media
    shopper = get_user_model().objects.create_user("shopper", "s@example.com", "pw")
    signed_in = Client()
    signed_in.force_login(shopper)
    assert signed_in.get(photo_url).status_code == 302
    assert signed_in.get("/admin/catalog/goldenquery/").status_code == 302
    staff = Client()
    staff.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    assert staff.get(photo_url).status_code == 200


def test_the_page_offers_it_only_where_a_shop_keeps_shoppers_photos(client):
    page = Client().get("/").content.decode()
    assert 'id="consent"' not in page
    _shop(keeps=True, slug="keeps", retention_days=14)
    factories.image(factories.Product.objects.get(sku="keeps-1"), "k")
    page = Client().get("/").content.decode()
    assert 'id="consent"' in page and "14 days" in page and '["keeps"]' in page
