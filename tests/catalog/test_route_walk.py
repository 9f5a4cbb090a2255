"""Every URL pattern the project serves, walked from `django.urls.get_resolver()`, each with its own expectation:
merchant B never reads or changes merchant A's data, an anonymous caller gets no merchant data, and staff without a
model's permission can neither see it nor run its actions (switch or cancel a version's indexing, resume an import,
see a golden query's photo).

`ROUTES` is the explicit table, one check per route (its name; an unnamed route by its pattern). A route added to
the project without an entry there fails `test_every_route_has_an_expectation`: nothing new escapes the walk. Each
check also proves the other side (A, or staff with the permission, does get the data), so none can pass vacuously.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from catalog.models import (
    DuplicateFinding,
    GoldenQuery,
    ImageFetch,
    ImportJob,
    Merchant,
    ModelVersion,
    Product,
    ProductImage,
    TrainingRun,
)
from catalog.services import golden, products
from tests import factories
from tests.catalog.ingest_helpers import csv_bytes, picture

pytestmark = pytest.mark.django_db

SECRET = "SECRET-ALPHA"  # in A's private data only (hidden product, import, rejected rows): never shown to others
A_SKU = "ALPHA-"  # every one of A's skus starts so: never in B's merchant API answers


# --- the walk --------------------------------------------------------------------------------------------------------
def walk(resolver: URLResolver | None = None, prefix: str = "", namespace: str = "") -> Iterator[tuple[str, str]]:
    """(key, full pattern) of every route: key = the namespaced name, or the full pattern if it has none."""
    for entry in (resolver or get_resolver()).url_patterns:
        if isinstance(entry, URLResolver):
            inner = f"{namespace}:{entry.namespace}" if namespace and entry.namespace else entry.namespace or namespace
            yield from walk(entry, prefix + str(entry.pattern), inner)
        else:
            assert isinstance(entry, URLPattern)
            pattern = prefix + str(entry.pattern)
            name = f"{namespace}:{entry.name}" if namespace and entry.name else entry.name
            yield name or pattern, pattern


# --- the world: two merchants, staff of three kinds ----------------------------------------------------------------
@dataclass
class World:
    anonymous: APIClient
    a: APIClient  # merchant A's token
    b: APIClient  # merchant B's token
    b_session: Client  # merchant B logged in (not staff): the admin must not open for it
    staff_bare: Client  # staff, no permission at all
    staff_view: Client  # staff who may view versions, imports, golden queries: not change them
    staff_change: Client  # staff who may change versions and imports
    a_product: Product
    a_hidden: Product
    a_image: ProductImage
    a_job: ImportJob
    b_product: Product
    b_image: ProductImage
    version: ModelVersion
    ready: ModelVersion
    golden_query: GoldenQuery


def _token_client(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


def _staff(username: str, *codenames: str) -> Client:
    user = get_user_model().objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = Client()
    client.force_login(user)
    return client


def _embed(image: ProductImage, version: ModelVersion, seed: int) -> None:
    rng = np.random.default_rng(seed)
    factories.embedding(
        image=image,
        model_version=version,
        bits=rng.integers(0, 2, version.code_bits).astype(bool),
        fc7=rng.standard_normal(version.fc7_dim).astype(np.float32),
        category="dress",
    )


@pytest.fixture
def world(settings, tmp_path) -> World:
    settings.PRIVATE_MEDIA_ROOT = tmp_path / "private"
    settings.SEARCH_VERIFY = False
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # ~100 worlds: fast hashing
    users = get_user_model().objects
    alpha, beta = factories.merchant("alpha"), factories.merchant("beta")
    user_a, user_b = users.create_user("alpha-user", password="pw-alpha"), users.create_user("beta-user", password="pw")
    alpha.users.add(user_a)
    beta.users.add(user_b)
    version = ModelVersion.objects.create(name="v-active", status="active", checkpoint="v.pt", code_bits=8, fc7_dim=4)
    ready = ModelVersion.objects.create(name="v-ready", status="ready", checkpoint="r.pt", code_bits=8, fc7_dim=4)

    a_product = factories.product(alpha, sku="ALPHA-1", title="Alpha dress", category="dress")
    a_twin = factories.product(alpha, sku="ALPHA-2", title="Alpha dress again", category="dress")
    a_hidden = factories.product(alpha, sku=f"ALPHA-{SECRET}", title=SECRET, category=SECRET.lower(), active=False)
    b_product = factories.product(beta, sku="BETA-1", title="Beta dress", category="dress")
    images = {}
    for seed, product in enumerate((a_product, a_twin, a_hidden, b_product)):
        images[product.sku] = products.image_add(product=product, data=picture(seed), enqueue=False).image
        _embed(images[product.sku], version, seed)
    kinds = DuplicateFinding.Kind
    DuplicateFinding.objects.create(
        merchant=alpha,
        image=images["ALPHA-1"],
        other_image=images["ALPHA-2"],
        model_version=version,
        kind=kinds.DUPLICATE_LISTING,
        hamming=0,
        fc7_distance=0,
    )
    DuplicateFinding.objects.create(
        merchant=beta,
        image=images["BETA-1"],
        other_image=images[a_hidden.sku],
        model_version=version,
        kind=kinds.POSSIBLE_COPY,
        hamming=1,
        fc7_distance=0.1,
    )
    a_job = ImportJob.objects.create(
        merchant=alpha,
        source_name=f"{SECRET}.csv",
        total=2,
        processed=2,
        ok=1,
        rejected=1,
        state="done",
        errors=[{"line": 3, "sku": SECRET, "error": SECRET}],
    )
    ImportJob.objects.create(merchant=beta, source_name="beta.csv", state="done")
    Group.objects.create(name="editors")  # every admin model has a row, so its object routes answer for a real one
    TrainingRun.objects.create(state="done")
    b_session = Client()
    b_session.force_login(user_b)
    return World(
        # an address of its own: throttle counters live in the shared Redis and outlast a test run
        anonymous=APIClient(REMOTE_ADDR=f"10.77.{random.randrange(256)}.{random.randrange(1, 255)}"),
        a=_token_client(user_a),
        b=_token_client(user_b),
        b_session=b_session,
        staff_bare=_staff("staff-bare"),
        staff_view=_staff("staff-view", "view_modelversion", "view_importjob", "view_goldenquery"),
        staff_change=_staff(
            "staff-change", "view_modelversion", "change_modelversion", "view_importjob", "change_importjob"
        ),
        a_product=a_product,
        a_hidden=a_hidden,
        a_image=images["ALPHA-1"],
        a_job=a_job,
        b_product=b_product,
        b_image=images["BETA-1"],
        version=version,
        ready=ready,
        golden_query=golden.golden_query_add(product=a_product, photo=picture(7), source="shopper"),
    )


# --- assertions shared by the checks ----------------------------------------------------------------------------
def body(response: Any) -> str:
    if getattr(response, "streaming", False):
        return b"".join(response.streaming_content).decode(errors="replace")
    return response.content.decode(errors="replace")


def no_private(response: Any) -> Any:
    """No server error and nothing of A's private data in the answer."""
    assert response.status_code < 500, body(response)[:500]
    assert SECRET not in body(response) and SECRET.lower() not in body(response)
    return response


def nothing_of_a(response: Any) -> Any:
    """For B's merchant API answers: no server error, and none of A's products at all."""
    no_private(response)
    assert A_SKU not in body(response), body(response)[:500]
    return response


def refused_anonymous(response: Any) -> None:
    assert no_private(response).status_code in (401, 403)


def to_login(response: Any) -> None:
    """The admin sends whoever is not staff to its login page, with nothing else."""
    no_private(response)
    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login")), response


def admin_refuses_outsiders(w: World, url: str) -> None:
    to_login(w.anonymous.get(url))
    to_login(w.b_session.get(url))


# --- the public routes -------------------------------------------------------------------------------------------
def check_home(w: World) -> None:
    page = body(no_private(w.anonymous.get(reverse("catalog:home"))))
    assert "Alpha" in page  # the shop's public facets (merchants with visible products) are shown


def check_healthz(w: World) -> None:
    answer = no_private(w.anonymous.get(reverse("healthz"))).json()
    assert set(answer) == {"status", "checks"} and "workers" not in answer["checks"]  # no host names


def check_schema(w: World) -> None:
    assert no_private(w.anonymous.get(reverse("schema"))).status_code == 200


def check_swagger(w: World) -> None:
    assert no_private(w.anonymous.get(reverse("swagger-ui"))).status_code == 200


def check_search(w: World) -> None:
    url = reverse("api:search")
    assert no_private(w.anonymous.post(url, {}, format="multipart")).status_code == 400
    junk = {"image": io.BytesIO(b"not an image")}
    assert no_private(w.anonymous.post(url, junk, format="multipart")).status_code == 400


def check_similar(w: World) -> None:
    found = no_private(w.anonymous.get(reverse("api:product-similar", args=[w.b_product.pk]))).json()
    skus = {hit["product"]["sku"] for hit in found["results"]}
    assert "ALPHA-1" in skus and w.a_hidden.sku not in skus  # visible products are the shop's; hidden ones are not
    assert no_private(w.anonymous.get(reverse("api:product-similar", args=[w.a_hidden.pk]))).status_code == 404


def check_search_confirm(w: World) -> None:
    """A shopper's "this is the one": nothing is stored for a hidden product, a shop that does not keep shoppers'
    photos, or without consent; what is stored is a golden query, which no API route reads back."""
    url = reverse("api:search-confirm")
    before = GoldenQuery.objects.count()

    def confirm(product: Product, consent: bool = True) -> Any:
        photo = io.BytesIO(picture(30))
        return w.anonymous.post(url, {"image": photo, "product": product.pk, "consent": consent}, format="multipart")

    assert nothing_of_a(confirm(w.a_hidden)).status_code == 404
    assert nothing_of_a(confirm(w.a_product)).status_code == 403  # alpha does not keep shoppers' photos
    Merchant.objects.filter(slug="alpha").update(golden_from_shoppers=True)
    assert nothing_of_a(confirm(w.a_product, consent=False)).status_code == 400
    assert GoldenQuery.objects.count() == before
    answer = confirm(w.a_product)
    assert answer.status_code == 201 and SECRET not in body(answer)
    assert GoldenQuery.objects.count() == before + 1


def check_auth_token(w: World) -> None:
    url = reverse("api:auth-token")
    assert no_private(w.anonymous.post(url, {"username": "alpha-user", "password": "wrong"})).status_code == 400
    token = no_private(w.anonymous.post(url, {"username": "alpha-user", "password": "pw-alpha"})).json()["token"]
    assert set(w.anonymous.post(url, {"username": "beta-user", "password": "pw"}).json()) == {"token"}
    assert token == Token.objects.get(user__username="alpha-user").key


def check_model_versions(w: World) -> None:
    url = reverse("api:model-version-list")
    refused_anonymous(w.anonymous.get(url))
    assert no_private(w.b.get(url)).status_code == 403
    user = get_user_model().objects.create_user("api-staff", is_staff=True)
    assert {v["name"] for v in _token_client(user).get(url).json()} == {"v-active", "v-ready"}


# --- the merchant API ----------------------------------------------------------------------------------------------
def check_merchants(w: World) -> None:
    url = reverse("api:merchant-list")
    refused_anonymous(w.anonymous.get(url))
    assert [m["slug"] for m in nothing_of_a(w.b.get(url)).json()] == ["beta"]
    assert [m["slug"] for m in w.a.get(url).json()] == ["alpha"]


def check_products(w: World) -> None:
    url = reverse("api:merchant-product-list")
    refused_anonymous(w.anonymous.get(url))
    refused_anonymous(w.anonymous.post(url, {"sku": "X", "title": "x"}, format="json"))
    for params in ({}, {"q": "Alpha"}, {"q": "ALPHA"}, {"category": "dress"}, {"active": "false"}):
        nothing_of_a(w.b.get(url, params))
    assert nothing_of_a(w.b.get(url, {"merchant": "alpha"})).json()["count"] == 0
    before = Product.objects.filter(merchant__slug="alpha").count()
    into_a = {"merchant": "alpha", "sku": "ALPHA-1", "title": "x"}
    assert nothing_of_a(w.b.post(url, into_a, format="json")).status_code == 404
    own = no_private(w.b.post(url, {"sku": "ALPHA-1", "title": "B's own"}, format="json"))  # A's sku: B's own row
    assert own.status_code == 201 and own.json()["merchant"] == "beta"
    assert Product.objects.filter(merchant__slug="alpha").count() == before
    assert Product.objects.get(pk=w.a_product.pk).title == "Alpha dress"
    assert w.a.get(url, {"active": "false"}).json()["results"][0]["title"] == SECRET


def check_product_detail(w: World) -> None:
    url = reverse("api:merchant-product-detail", args=[w.a_product.pk])
    refused_anonymous(w.anonymous.get(url))
    refused_anonymous(w.anonymous.patch(url, {"title": "pwned"}, format="json"))
    refused_anonymous(w.anonymous.delete(url))
    assert nothing_of_a(w.b.get(url)).status_code == 404
    assert nothing_of_a(w.b.patch(url, {"title": "pwned", "active": False}, format="json")).status_code == 404
    assert nothing_of_a(w.b.delete(url)).status_code == 404
    assert no_private(w.b.get(reverse("api:merchant-product-detail", args=[w.a_hidden.pk]))).status_code == 404
    w.a_product.refresh_from_db()
    assert (w.a_product.title, w.a_product.active) == ("Alpha dress", True)
    assert w.a.get(url).json()["sku"] == "ALPHA-1"


def check_product_images(w: World) -> None:
    url = reverse("api:merchant-product-images", args=[w.a_product.pk])
    refused_anonymous(w.anonymous.get(url))
    refused_anonymous(w.anonymous.post(url, {"file": io.BytesIO(picture(20))}, format="multipart"))
    assert nothing_of_a(w.b.get(url)).status_code == 404
    assert nothing_of_a(w.b.post(url, {"file": io.BytesIO(picture(21))}, format="multipart")).status_code == 404
    assert ProductImage.objects.filter(product=w.a_product).count() == 1
    assert [image["id"] for image in w.a.get(url).json()] == [w.a_image.pk]


def check_image_detail(w: World) -> None:
    url = reverse("api:merchant-product-image-detail", args=[w.a_product.pk, w.a_image.pk])
    refused_anonymous(w.anonymous.delete(url))
    assert nothing_of_a(w.b.delete(url)).status_code == 404
    # B's own product with A's image id: still not A's image
    crossed = reverse("api:merchant-product-image-detail", args=[w.b_product.pk, w.a_image.pk])
    assert nothing_of_a(w.b.delete(crossed)).status_code == 404
    assert ProductImage.objects.filter(pk=w.a_image.pk).exists()
    assert w.a.delete(crossed).status_code == 404  # A cannot reach it through B's product either
    assert w.a.delete(url).status_code == 204


def check_image_retry(w: World) -> None:
    ProductImage.objects.filter(pk=w.a_image.pk).update(status=ProductImage.Status.FAILED, error=SECRET)
    url = reverse("api:merchant-product-image-retry", args=[w.a_product.pk, w.a_image.pk])
    refused_anonymous(w.anonymous.post(url))
    assert nothing_of_a(w.b.post(url)).status_code == 404
    crossed = reverse("api:merchant-product-image-retry", args=[w.b_product.pk, w.a_image.pk])
    assert nothing_of_a(w.b.post(crossed)).status_code == 404
    assert ProductImage.objects.get(pk=w.a_image.pk).status == ProductImage.Status.FAILED  # B changed nothing
    assert w.a.post(url).json()["status"] == "pending"


def check_image_fetch_detail(w: World) -> None:
    fetch = ImageFetch.objects.create(product=w.a_product, url=f"https://alpha.example/{SECRET}.jpg")
    url = reverse("api:merchant-image-fetch-detail", args=[fetch.pk])
    refused_anonymous(w.anonymous.get(url))
    assert nothing_of_a(w.b.get(url)).status_code == 404
    assert w.a.get(url).json()["state"] == "pending"
    # B cannot ask for a fetch onto A's product either
    images_url = reverse("api:merchant-product-images", args=[w.a_product.pk])
    assert nothing_of_a(w.b.post(images_url, {"url": "https://beta.example/x.jpg"}, format="json")).status_code == 404
    assert ImageFetch.objects.filter(product=w.a_product).count() == 1


def check_imports(w: World) -> None:
    url = reverse("api:merchant-import-list")
    refused_anonymous(w.anonymous.get(url))
    listed = nothing_of_a(w.b.get(url)).json()
    assert [job["source_name"] for job in listed["results"]] == ["beta.csv"]
    upload = {"merchant": "alpha", "manifest": io.BytesIO(csv_bytes([{"sku": "X", "title": "x"}]))}
    assert nothing_of_a(w.b.post(url, upload, format="multipart")).status_code == 404
    assert ImportJob.objects.filter(merchant__slug="alpha").count() == 1
    assert w.a.get(url).json()["results"][0]["source_name"] == f"{SECRET}.csv"


def check_import_detail(w: World) -> None:
    url = reverse("api:merchant-import-detail", args=[w.a_job.pk])
    refused_anonymous(w.anonymous.get(url))
    assert nothing_of_a(w.b.get(url)).status_code == 404
    assert w.a.get(url).json()["rejected"] == 1


def check_import_rejected(w: World) -> None:
    url = reverse("api:merchant-import-rejected", args=[w.a_job.pk])
    refused_anonymous(w.anonymous.get(url))
    assert nothing_of_a(w.b.get(url)).status_code == 404
    assert w.a.get(url).json()["results"][0]["sku"] == SECRET


def check_duplicates(w: World) -> None:
    url = reverse("api:merchant-duplicate-list")
    refused_anonymous(w.anonymous.get(url))
    mine = nothing_of_a(w.b.get(url)).json()["results"]  # B's possible copy of A's image never describes A's product
    assert [(f["kind"], f["image"]["sku"], f["other"]) for f in mine] == [("possible_copy", "BETA-1", None)]
    assert w.a.get(url).json()["results"][0]["other"]["sku"] == "ALPHA-2"


# --- the admin -----------------------------------------------------------------------------------------------------
ADMIN_MODELS = {  # every ModelAdmin: (app_label, model name)
    ("auth", "group"),
    ("auth", "user"),
    ("authtoken", "tokenproxy"),
    ("catalog", "merchant"),
    ("catalog", "product"),
    ("catalog", "modelversion"),
    ("catalog", "imageembedding"),
    ("catalog", "importjob"),
    ("catalog", "duplicatefinding"),
    ("catalog", "trainingrun"),
    ("catalog", "goldenquery"),
}


def _some_object_id(app: str, model: str) -> str:
    row = ContentType.objects.get(app_label=app, model=model).model_class()._default_manager.order_by("pk").first()
    assert row is not None, f"the world has no {app}.{model}"
    return str(row.pk)


def admin_model_check(app: str, model: str, view: str) -> Callable[[World], None]:
    """One of the routes every ModelAdmin has: outsiders go to the login page, staff without the model's permission
    get 403 (or, for `<id>/`, a redirect to the change page that refuses them)."""

    def check(w: World) -> None:
        object_id = _some_object_id(app, model)
        if view == "redirect":
            url = f"/admin/{app}/{model}/{object_id}/"
        else:
            name = f"admin:{app}_{model}_{view}"
            url = reverse(name) if view in ("changelist", "add") else reverse(name, args=[object_id])
        admin_refuses_outsiders(w, url)
        bare = no_private(w.staff_bare.get(url, follow=view == "redirect"))
        assert bare.status_code == 403, (url, bare.status_code)

    return check


def check_admin_index(w: World) -> None:
    url = reverse("admin:index")
    admin_refuses_outsiders(w, url)
    assert "/admin/catalog/" not in body(no_private(w.staff_bare.get(url)))  # nothing listed without a permission
    assert "/admin/catalog/modelversion/" in body(w.staff_view.get(url))


def check_admin_login(w: World) -> None:
    url = reverse("admin:login")
    assert no_private(w.anonymous.get(url)).status_code == 200
    refused = Client().post(url, {"username": "beta-user", "password": "pw"})  # a merchant, not staff
    assert refused.status_code == 200 and "_auth_user_id" not in refused.wsgi_request.session


def check_admin_logout(w: World) -> None:
    assert no_private(w.anonymous.post(reverse("admin:logout"))).status_code in (200, 302)


def check_admin_password_change(w: World) -> None:
    admin_refuses_outsiders(w, reverse("admin:password_change"))


def check_admin_password_change_done(w: World) -> None:
    admin_refuses_outsiders(w, reverse("admin:password_change_done"))


def check_admin_autocomplete(w: World) -> None:
    url = reverse("admin:autocomplete")
    params = {"app_label": "catalog", "model_name": "goldenquery", "field_name": "product", "term": "Alpha"}
    admin_refuses_outsiders(w, url)
    assert no_private(w.staff_bare.get(url, params)).status_code == 403


def check_admin_jsi18n(w: World) -> None:
    admin_refuses_outsiders(w, reverse("admin:jsi18n"))


def check_admin_view_on_site(w: World) -> None:
    product_type = ContentType.objects.get_for_model(Product)
    url = reverse("admin:view_on_site", args=[product_type.pk, w.a_hidden.pk])
    admin_refuses_outsiders(w, url)
    assert no_private(w.staff_bare.get(url)).status_code == 404  # products have no page of their own to redirect to


def check_admin_app_list(w: World) -> None:
    url = reverse("admin:app_list", args=["catalog"])
    admin_refuses_outsiders(w, url)
    assert no_private(w.staff_bare.get(url)).status_code == 404
    assert w.staff_view.get(url).status_code == 200


def check_admin_catch_all(w: World) -> None:
    admin_refuses_outsiders(w, "/admin/no/such/page/")
    assert no_private(w.staff_bare.get("/admin/no/such/page/")).status_code == 404


def check_admin_import_upload(w: World) -> None:
    url = reverse("admin:catalog_importjob_upload")
    admin_refuses_outsiders(w, url)
    assert no_private(w.staff_bare.get(url)).status_code == 403
    assert no_private(w.staff_view.get(url)).status_code == 403  # viewing imports is not uploading one
    assert w.staff_change.get(url).status_code == 200


def check_admin_import_progress(w: World) -> None:
    url = reverse("admin:catalog_importjob_progress", args=[w.a_job.pk])
    admin_refuses_outsiders(w, url)
    assert no_private(w.staff_bare.get(url)).status_code == 403
    assert w.staff_view.get(url).json()["rejected"] == 1


def check_admin_golden_photo(w: World) -> None:
    url = reverse("admin:catalog_goldenquery_photo", args=[w.golden_query.pk])
    admin_refuses_outsiders(w, url)
    assert no_private(w.staff_bare.get(url)).status_code == 403
    photo = w.staff_view.get(url)
    assert photo.status_code == 200 and b"".join(photo.streaming_content)[:4] == b"\x89PNG"


def check_admin_version_compare(w: World) -> None:
    url = reverse("admin:catalog_modelversion_compare", args=[w.ready.pk])
    admin_refuses_outsiders(w, url)
    assert no_private(w.staff_bare.get(url)).status_code == 403
    assert w.staff_view.get(url).status_code == 200


def _action(client: Client, model: str, action: str, pk: int) -> Any:
    # override: the switch's "switch anyway" (the two versions have no golden numbers to compare)
    return client.post(f"/admin/catalog/{model}/", {"action": action, "_selected_action": [pk], "override": "1"})


def check_admin_version_actions(w: World) -> None:
    """The model-version changelist, where the switch and the cancel actions run: view permission is not enough."""
    admin_model_check("catalog", "modelversion", "changelist")(w)
    with connection.cursor() as cursor:  # the world's embedding triggers fire now: the switch creates an index,
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # which PostgreSQL refuses with events pending (one test tx)
    to_login(_action(w.anonymous, "modelversion", "switch_to_version", w.ready.pk))
    to_login(_action(w.b_session, "modelversion", "switch_to_version", w.ready.pk))
    assert _action(w.staff_bare, "modelversion", "switch_to_version", w.ready.pk).status_code == 403
    _action(w.staff_view, "modelversion", "switch_to_version", w.ready.pk)
    assert ModelVersion.objects.get(pk=w.ready.pk).status == "ready"
    # the staff who may change versions does switch it (so the refusals above are the permission, not the action)
    _action(w.staff_change, "modelversion", "switch_to_version", w.ready.pk)
    assert ModelVersion.objects.get(pk=w.ready.pk).status == "indexing"
    _action(w.staff_view, "modelversion", "cancel_indexing", w.ready.pk)
    assert ModelVersion.objects.get(pk=w.ready.pk).status == "indexing"
    _action(w.staff_change, "modelversion", "cancel_indexing", w.ready.pk)
    assert ModelVersion.objects.get(pk=w.ready.pk).status == "ready"
    assert ModelVersion.objects.get(pk=w.version.pk).status == "active"


def check_admin_import_actions(w: World) -> None:
    """The import changelist, where "resume" re-queues a job's unfinished chunks: view permission is not enough."""
    admin_model_check("catalog", "importjob", "changelist")(w)
    ImportJob.objects.filter(pk=w.a_job.pk).update(state="running")
    shown = " ".join(str(m) for m in _action(w.staff_view, "importjob", "resume", w.a_job.pk).wsgi_request._messages)
    assert "chunks queued again" not in shown
    changed = _action(w.staff_change, "importjob", "resume", w.a_job.pk)
    assert "0 chunks queued again" in " ".join(str(m) for m in changed.wsgi_request._messages)


def check_admin_user_password(w: World) -> None:
    url = reverse("admin:auth_user_password_change", args=[get_user_model().objects.get(username="alpha-user").pk])
    admin_refuses_outsiders(w, url)
    assert no_private(w.staff_bare.get(url)).status_code == 403


def _admin_model_routes() -> dict[str, Callable[[World], None]]:
    routes: dict[str, Callable[[World], None]] = {}
    for app, model in ADMIN_MODELS:
        for view in ("changelist", "add", "history", "delete", "change"):
            routes[f"admin:{app}_{model}_{view}"] = admin_model_check(app, model, view)
        routes[f"admin/{app}/{model}/<path:object_id>/"] = admin_model_check(app, model, "redirect")
    routes["admin:catalog_modelversion_changelist"] = check_admin_version_actions
    routes["admin:catalog_importjob_changelist"] = check_admin_import_actions
    routes["admin:auth_user_password_change"] = check_admin_user_password
    return routes


ROUTES: dict[str, Callable[[World], None]] = {
    "catalog:home": check_home,
    "healthz": check_healthz,
    "schema": check_schema,
    "swagger-ui": check_swagger,
    "api:search": check_search,
    "api:product-similar": check_similar,
    "api:auth-token": check_auth_token,
    "api:search-confirm": check_search_confirm,
    "api:model-version-list": check_model_versions,
    "api:merchant-list": check_merchants,
    "api:merchant-product-list": check_products,
    "api:merchant-product-detail": check_product_detail,
    "api:merchant-product-images": check_product_images,
    "api:merchant-product-image-detail": check_image_detail,
    "api:merchant-product-image-retry": check_image_retry,
    "api:merchant-image-fetch-detail": check_image_fetch_detail,
    "api:merchant-import-list": check_imports,
    "api:merchant-import-detail": check_import_detail,
    "api:merchant-import-rejected": check_import_rejected,
    "api:merchant-duplicate-list": check_duplicates,
    "admin:index": check_admin_index,
    "admin:login": check_admin_login,
    "admin:logout": check_admin_logout,
    "admin:password_change": check_admin_password_change,
    "admin:password_change_done": check_admin_password_change_done,
    "admin:autocomplete": check_admin_autocomplete,
    "admin:jsi18n": check_admin_jsi18n,
    "admin:view_on_site": check_admin_view_on_site,
    "admin:app_list": check_admin_app_list,
    "admin/(?P<url>.*)$": check_admin_catch_all,
    "admin:catalog_importjob_upload": check_admin_import_upload,
    "admin:catalog_importjob_progress": check_admin_import_progress,
    "admin:catalog_goldenquery_photo": check_admin_golden_photo,
    "admin:catalog_modelversion_compare": check_admin_version_compare,
    **_admin_model_routes(),
}


def test_every_route_has_an_expectation():
    served = {key for key, _ in walk()}
    assert served - set(ROUTES) == set(), "routes without an expectation: add them to ROUTES"
    assert set(ROUTES) - served == set(), "expectations for routes that no longer exist"


@pytest.mark.parametrize("route", sorted(key for key, _ in walk()))
def test_route(route, world):
    ROUTES[route](world)
