"""The way back for an image that failed (its embedding killed the worker EMBED_MAX_ATTEMPTS times, or its file did
not decode): the merchant sees why through the API and retries it (the retry route, or uploading the file again);
an admin retries the failed images of chosen products. Each resets the attempt count and queues the embedding;
asking to retry an image that has not failed is a clear 409 that changes nothing."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.urls import reverse

from catalog import dispatch
from catalog.models import ProductImage
from catalog.services import embeddings, products
from tests import factories
from tests.catalog.ingest_helpers import picture

pytestmark = pytest.mark.django_db


@pytest.fixture
def shop(merchant_client):
    merchant = factories.merchant("alpha")
    product = factories.product(merchant, sku="A-1")
    image = products.image_add(product=product, data=picture(1), enqueue=False).image
    return {"client": merchant_client(merchant=merchant), "product": product, "image": image}


def _give_up(image: ProductImage) -> None:
    """As the embed pipeline leaves an image its worker died on EMBED_MAX_ATTEMPTS times."""
    ProductImage.objects.filter(pk=image.pk).update(embed_attempts=3, embed_attempt_by="t:0")
    assert embeddings.images_embed_give_up(image_ids=[image.pk]) == 1


def _retry_url(image: ProductImage) -> str:
    return reverse("api:merchant-product-image-retry", args=[image.product_id, image.pk])


def _queued(callbacks) -> list[list[int]]:
    """The image ids of the embed tasks these on-commit callbacks send."""
    return [c.args[1] for c in callbacks if getattr(c, "args", None) and c.args[0] is dispatch.EMBED_IMAGES]


def test_the_merchant_sees_why_an_image_failed_and_retries_it(shop, django_capture_on_commit_callbacks):
    image, client = shop["image"], shop["client"]
    _give_up(image)
    listed = client.get(reverse("api:merchant-product-images", args=[image.product_id])).json()
    assert [(row["status"], row["embed_attempts"]) for row in listed] == [("failed", 3)]
    assert "the worker processing it died 3 times" in listed[0]["error"]

    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(_retry_url(image))

    assert response.status_code == 202, response.content
    answer = response.json()
    assert (answer["status"], answer["error"], answer["embed_attempts"]) == ("pending", "", 0)
    image.refresh_from_db()
    assert (image.status, image.embed_attempts, image.embed_attempt_by) == ("pending", 0, "")
    assert _queued(callbacks) == [[image.pk]]


@pytest.mark.parametrize("status", ["pending", "embedded"])
def test_retrying_an_image_that_has_not_failed_is_a_409_that_changes_nothing(
    shop, status, django_capture_on_commit_callbacks
):
    image, client = shop["image"], shop["client"]
    ProductImage.objects.filter(pk=image.pk).update(status=status, embed_attempts=1)
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(_retry_url(image))
    assert response.status_code == 409
    assert response.json() == {"detail": f"only a failed image can be retried; this one is {status}"}
    assert ProductImage.objects.filter(pk=image.pk).values_list("status", "embed_attempts").get() == (status, 1)
    assert _queued(callbacks) == []


def test_retrying_an_image_that_does_not_exist_is_a_404(shop):
    image, client = shop["image"], shop["client"]
    missing = reverse("api:merchant-product-image-retry", args=[image.product_id, image.pk + 999])
    assert client.post(missing).status_code == 404
    other = factories.product(image.product.merchant, sku="A-2")
    assert client.post(reverse("api:merchant-product-image-retry", args=[other.pk, image.pk])).status_code == 404
    assert client.get(_retry_url(image)).status_code == 405


def test_uploading_a_failed_image_again_retries_it(shop, django_capture_on_commit_callbacks):
    image, client = shop["image"], shop["client"]
    _give_up(image)
    upload = SimpleUploadedFile("again.png", picture(1), content_type="image/png")
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(reverse("api:merchant-product-images", args=[image.product_id]), {"file": upload})
    assert response.status_code == 200, response.content  # the same file: the same image, not a new one
    answer = response.json()
    assert (answer["id"], answer["status"], answer["embed_attempts"]) == (image.pk, "pending", 0)
    assert _queued(callbacks) == [[image.pk]]
    assert ProductImage.objects.filter(product=image.product).count() == 1


def test_an_admin_with_the_change_permission_retries_the_failed_images_of_chosen_products(
    shop, django_capture_on_commit_callbacks
):
    image = shop["image"]
    embedded = products.image_add(product=image.product, data=picture(2), enqueue=False).image
    ProductImage.objects.filter(pk=embedded.pk).update(status="embedded")
    _give_up(image)
    changelist = reverse("admin:catalog_product_changelist")
    action = {"action": "retry_failed_images", "_selected_action": [image.product_id]}

    viewer = get_user_model().objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_product"))
    as_viewer = Client()
    as_viewer.force_login(viewer)
    as_viewer.post(changelist, action, follow=True)
    assert ProductImage.objects.get(pk=image.pk).status == "failed"  # no change permission: no retry

    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin.post(changelist, action, follow=True)
    assert "1 failed image(s) queued for embedding again" in " ".join(str(m) for m in response.context["messages"])
    assert dict(ProductImage.objects.values_list("pk", "status")) == {image.pk: "pending", embedded.pk: "embedded"}
    assert _queued(callbacks) == [[image.pk]]
