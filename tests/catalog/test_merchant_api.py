"""The merchant API: token and session auth, every route scoped to the user's own merchants, updates, deletes."""

import io

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from pgvector import Bit
from rest_framework.test import APIClient

from catalog.models import DuplicateFinding, ImageEmbedding, ImportJob, IndexChange, ModelVersion, Product, ProductImage
from catalog.services import embeddings, products
from tests import factories
from tests.catalog.ingest_helpers import catalog, picture, run_inline

pytestmark = pytest.mark.django_db


def _owner(slug: str):
    merchant = factories.merchant(slug)
    user = get_user_model().objects.create_user(f"{slug}-user", password="pw-" + slug)
    merchant.users.add(user)
    return merchant, user


def _version() -> ModelVersion:
    return ModelVersion.objects.create(name="v-test", status=ModelVersion.Status.ACTIVE, code_bits=8, fc7_dim=4)


def _embed(image: ProductImage, version: ModelVersion, seed: int = 0) -> ImageEmbedding:
    rng = np.random.default_rng(seed)
    return ImageEmbedding.objects.create(
        image=image,
        model_version=version,
        product_id=image.product_id,
        code=Bit(rng.integers(0, 2, 8).astype(bool)).to_text(),
        fc7=rng.standard_normal(4).astype(np.float32),
    )


@pytest.fixture
def shop_a():
    """Merchant A with a product, an image, an import job and two duplicate findings."""
    merchant, user = _owner("alpha")
    product = factories.product(merchant, sku="A-1", title="Alpha dress", category="dress")
    image = products.image_add(product=product, data=picture(1), enqueue=False).image
    twin = factories.product(merchant, sku="A-2", title="Alpha dress again")
    twin_image = products.image_add(product=twin, data=picture(1), enqueue=False).image
    job = ImportJob.objects.create(merchant=merchant, total=1, processed=1, rejected=1, state="done",
                                   errors=[{"line": 2, "sku": "bad", "error": "title is required"}])  # fmt: skip
    return {
        "merchant": merchant,
        "user": user,
        "product": product,
        "image": image,
        "twin_image": twin_image,
        "job": job,
    }


def test_token_and_session_auth_and_unauthenticated_access(shop_a, merchant_client):
    url = reverse("api:merchant-product-list")
    assert APIClient().get(url).status_code in (401, 403)
    token = APIClient().post(reverse("api:auth-token"), {"username": "alpha-user", "password": "pw-alpha"}).json()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token['token']}")
    assert client.get(url).json()["count"] == 2
    session = APIClient()
    assert session.login(username="alpha-user", password="pw-alpha")
    assert session.get(url).json()["count"] == 2
    loner = get_user_model().objects.create_user("no-merchant")
    assert merchant_client(loner).get(url).status_code == 403


def test_merchant_b_cannot_read_change_or_find_a_catalog_through_any_route(shop_a, merchant_client):
    _, user_b = _owner("beta")
    b = merchant_client(user_b)
    a_product, a_image, a_job = shop_a["product"], shop_a["image"], shop_a["job"]
    version = _version()
    _embed(a_image, version)
    DuplicateFinding.objects.create(
        merchant=shop_a["merchant"], image=a_image, other_image=shop_a["twin_image"], model_version=version,
        kind="duplicate_listing", hamming=0, fc7_distance=0.0,
    )  # fmt: skip

    # Lists and filters find nothing of A's.
    for params in ({}, {"q": "Alpha"}, {"q": "A-1"}, {"category": "dress"}, {"merchant": "alpha"}):
        assert b.get(reverse("api:merchant-product-list"), params).json()["count"] == 0
    assert b.get(reverse("api:merchant-import-list")).json()["count"] == 0
    assert b.get(reverse("api:merchant-duplicate-list")).json()["count"] == 0
    assert [merchant["slug"] for merchant in b.get(reverse("api:merchant-list")).json()] == ["beta"]

    # Every detail route is a 404 (not a 403: ids reveal nothing).
    product_url = reverse("api:merchant-product-detail", args=[a_product.pk])
    images_url = reverse("api:merchant-product-images", args=[a_product.pk])
    image_url = reverse("api:merchant-product-image-detail", args=[a_product.pk, a_image.pk])
    assert b.get(product_url).status_code == 404
    assert b.patch(product_url, {"title": "pwned", "active": False}, format="json").status_code == 404
    assert b.delete(product_url).status_code == 404
    assert b.get(images_url).status_code == 404
    upload = {"file": io.BytesIO(picture(9))}
    assert b.post(images_url, upload, format="multipart").status_code == 404
    assert b.delete(image_url).status_code == 404
    assert b.get(reverse("api:merchant-import-detail", args=[a_job.pk])).status_code == 404
    assert b.get(reverse("api:merchant-import-rejected", args=[a_job.pk])).status_code == 404
    # Writing into A by naming it is refused too.
    create = {"merchant": "alpha", "sku": "B-1", "title": "sneaky"}
    assert b.post(reverse("api:merchant-product-list"), create, format="json").status_code == 404
    manifest = {"merchant": "alpha", "manifest": io.BytesIO(b"sku,title\nX,y\n")}
    assert b.post(reverse("api:merchant-import-list"), manifest, format="multipart").status_code == 404

    # Nothing of A's changed.
    a_product.refresh_from_db()
    assert (a_product.title, a_product.active) == ("Alpha dress", True)
    assert ProductImage.objects.filter(product=a_product).count() == 1
    assert Product.objects.filter(merchant__slug="beta").count() == 0

    # And A sees all of it.
    a = merchant_client(shop_a["user"])
    assert a.get(product_url).json()["sku"] == "A-1"
    assert a.get(reverse("api:merchant-import-rejected", args=[a_job.pk])).json()["results"][0]["line"] == 2
    assert a.get(reverse("api:merchant-duplicate-list")).json()["count"] == 1


def test_update_and_delete_hide_the_product_from_search_data_at_once(shop_a, merchant_client):
    client = merchant_client(shop_a["user"])
    product, image = shop_a["product"], shop_a["image"]
    version = _version()
    _embed(image, version)
    url = reverse("api:merchant-product-detail", args=[product.pk])

    response = client.patch(url, {"title": "Evening dress", "price": "49.50", "active": False}, format="json")
    assert response.status_code == 200, response.content
    assert (response.json()["title"], response.json()["price"], response.json()["active"]) == (
        "Evening dress", "49.50", False,
    )  # fmt: skip
    assert IndexChange.objects.filter(op="product", product_id=product.pk).exists()
    assert client.patch(url, {"price": "-1"}, format="json").status_code == 400

    assert client.delete(url).status_code == 204
    assert not Product.objects.filter(pk=product.pk).exists()
    assert not ImageEmbedding.objects.filter(product_id=product.pk).exists()
    assert IndexChange.objects.filter(op="embedding", product_id=product.pk).count() == 2  # insert + delete
    assert client.get(url).status_code == 404


def test_create_a_product_idempotently(shop_a, merchant_client):
    client = merchant_client(shop_a["user"])
    url = reverse("api:merchant-product-list")
    body = {"sku": "NEW-1", "title": "New coat", "attributes": ["wool", "wool"], "price": "99.00"}
    created = client.post(url, body, format="json")
    assert created.status_code == 201 and created.json()["attributes"] == ["wool"]
    again = client.post(url, body, format="json")
    assert again.status_code == 200 and again.json()["id"] == created.json()["id"]
    assert client.post(url, {"sku": "", "title": "x"}, format="json").status_code == 400
    assert Product.objects.filter(sku="NEW-1", merchant=shop_a["merchant"]).count() == 1

    # A user acting for two merchants names the one a write is for.
    second = factories.merchant("alpha-outlet")
    second.users.add(shop_a["user"])
    ambiguous = client.post(url, {"sku": "NEW-2", "title": "Coat"}, format="json")
    assert ambiguous.status_code == 400 and "merchant" in ambiguous.json()
    named = client.post(url, {"sku": "NEW-2", "title": "Coat", "merchant": "alpha-outlet"}, format="json")
    assert named.status_code == 201 and named.json()["merchant"] == "alpha-outlet"
    assert client.get(url, {"merchant": "alpha-outlet"}).json()["count"] == 1
    assert client.get(url).json()["count"] == 4


def test_image_add_and_delete_through_the_api(shop_a, merchant_client):
    client = merchant_client(shop_a["user"])
    product = shop_a["product"]
    url = reverse("api:merchant-product-images", args=[product.pk])
    added = client.post(url, {"file": io.BytesIO(picture(7)), "position": 1}, format="multipart")
    assert added.status_code == 201, added.content
    again = client.post(url, {"file": io.BytesIO(picture(7)), "position": 1}, format="multipart")
    assert again.status_code == 200 and again.json()["id"] == added.json()["id"]
    bad = client.post(url, {"file": io.BytesIO(b"GIF89a nope")}, format="multipart")
    assert bad.status_code == 400 and "image" in bad.json()["detail"]
    assert client.post(url, {}, format="multipart").status_code == 400
    assert len(client.get(url).json()) == 2
    detail = reverse("api:merchant-product-image-detail", args=[product.pk, added.json()["id"]])
    assert client.delete(detail).status_code == 204
    assert ProductImage.objects.filter(product=product).count() == 1


def test_import_through_the_api_reports_progress_and_rejected_rows(shop_a, merchant_client):
    client = merchant_client(shop_a["user"])
    manifest, archive = catalog(3)
    manifest += b"BAD-1,,dress,1,\n"
    response = client.post(
        reverse("api:merchant-import-list"),
        {"manifest": io.BytesIO(manifest), "images": io.BytesIO(archive)},
        format="multipart",
    )
    assert response.status_code == 202, response.content
    job = response.json()
    assert (job["state"], job["total"], job["rejected"]) == ("pending", 4, 1)
    run_inline(ImportJob.objects.get(pk=job["id"]))
    detail = client.get(reverse("api:merchant-import-detail", args=[job["id"]])).json()
    assert (detail["state"], detail["processed"], detail["ok"], detail["rejected"]) == ("done", 4, 3, 1)
    assert detail["progress"]["percent"] == 100.0 and detail["progress"]["eta_seconds"] == 0.0
    assert detail["progress"]["images_new"] == 3
    rejected = client.get(reverse("api:merchant-import-rejected", args=[job["id"]])).json()["results"]
    assert rejected == [{"line": 5, "sku": "BAD-1", "error": "title is required"}]
    bad = client.post(reverse("api:merchant-import-list"), {"manifest": io.BytesIO(b"x,y\n1,2\n")}, format="multipart")
    assert bad.status_code == 400 and "no sku" in bad.json()["detail"]


def test_duplicates_show_own_products_only(shop_a, merchant_client):
    """A duplicate listing names the merchant's own twin; a possible copy never describes the other merchant."""
    merchant_b, user_b = _owner("beta")
    copy = products.image_add(product=factories.product(merchant_b, sku="B-COPY"), data=picture(1), enqueue=False)
    version = _version()
    images = [shop_a["image"], shop_a["twin_image"], copy.image]
    for image in images:
        _embed(image, version, seed=42)  # identical code and fc7: the same picture
    created = embeddings.duplicates_find(model_version=version, image_ids=[image.pk for image in images])
    assert created == 6  # three pairs, both directions
    assert embeddings.duplicates_find(model_version=version, image_ids=[images[0].pk]) == 0  # idempotent

    a = merchant_client(shop_a["user"]).get(reverse("api:merchant-duplicate-list")).json()["results"]
    listing = [f for f in a if f["kind"] == "duplicate_listing"]
    copies = [f for f in a if f["kind"] == "possible_copy"]
    assert len(listing) == 2 and {f["other"]["sku"] for f in listing} == {"A-1", "A-2"}
    assert len(copies) == 2 and all(f["other"] is None for f in copies)
    duplicates = reverse("api:merchant-duplicate-list")
    listing_only = merchant_client(shop_a["user"]).get(duplicates, {"kind": "duplicate_listing"})
    assert listing_only.json()["count"] == 2
    assert merchant_client(user_b).get(reverse("api:merchant-duplicate-list"), {"kind": "nope"}).status_code == 400
    b = merchant_client(user_b).get(reverse("api:merchant-duplicate-list")).json()
    assert b["count"] == 2 and all(f["kind"] == "possible_copy" and f["other"] is None for f in b["results"])
    assert "alpha" not in str(b).lower() and "A-1" not in str(b)
