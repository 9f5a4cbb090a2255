"""Products and their images, one at a time: what the merchant API, the admin and the demo catalog write through.

Every product write, one product or an import chunk's many (catalog.services.imports), goes through
`products_upsert`: one field mapping, one change detection, safe against concurrent writers of the same skus. An
image is validated, stored once per product (by the sha256 of the uploaded file) and queued for embedding after
commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Required, TypedDict, Unpack

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import connection, transaction
from django.utils import timezone

from catalog import dispatch
from catalog.intake import IntakeError
from catalog.intake.fetch import url_fetch
from catalog.intake.images import ValidatedImage, image_validate
from catalog.models import ImageFetch, Merchant, Product, ProductImage


@dataclass(frozen=True)
class UpsertResult:
    product: Product
    created: bool
    changed: bool  # False when the same data was written again (idempotent re-upload)


PRODUCT_FIELDS = ("title", "description", "category", "attributes", "price", "url", "active")
UPSERT_ROUNDS = 3  # a product deleted between our check and our lock is inserted again; more is a pathological race


class ProductFields(TypedDict, total=False):
    """A product's writable fields as callers give them (PRODUCT_FIELDS; only the title is required)."""

    title: Required[str]
    description: str
    category: str
    attributes: Sequence[str]
    price: Decimal | str | None
    url: str
    active: bool


def product_values(**fields: Unpack[ProductFields]) -> dict[str, Any]:
    """A product's PRODUCT_FIELDS in stored form, defaults filled in: what `products_upsert` compares and writes."""
    price = fields.get("price")
    return {
        "title": fields["title"],
        "description": fields.get("description", ""),
        "category": fields.get("category", ""),
        "attributes": sorted(set(fields.get("attributes", ()))),
        "price": None if price is None else Decimal(price).quantize(Decimal("0.01")),
        "url": fields.get("url", ""),
        "active": fields.get("active", True),
    }


def product_upsert(*, merchant: Merchant, sku: str, **fields: Unpack[ProductFields]) -> UpsertResult:
    """Create or update the product (merchant, sku); writes nothing when nothing changed."""
    with transaction.atomic():
        return products_upsert(merchant=merchant, values={sku: product_values(**fields)})[sku]


def products_upsert(*, merchant: Merchant, values: dict[str, dict[str, Any]]) -> dict[str, UpsertResult]:
    """Create or update many products of one merchant (sku -> `product_values`); writes nothing where nothing
    changed. Call it inside a transaction: the products stay locked until it ends.

    Concurrent writers of the same skus (two imports of one catalog, an import and the API) need no retry: missing
    skus are inserted with ON CONFLICT DO NOTHING, which waits for a concurrent insert of the same sku to commit and
    then leaves its row alone; then every row is locked and compared with what we would write. Inserts and locks
    both go in sku order, so two writers never wait for each other in a circle.
    """
    skus = sorted(values)
    created: set[str] = set()
    products: dict[str, Product] = {}
    for _ in range(UPSERT_ROUNDS):
        missing = [sku for sku in skus if sku not in products]
        if not missing:
            break
        created |= _products_insert(merchant=merchant, values={sku: values[sku] for sku in missing})
        locked = Product.objects.select_for_update().filter(merchant=merchant, sku__in=missing).order_by("sku")
        products.update((product.sku, product) for product in locked)
    if len(products) < len(skus):
        raise RuntimeError(f"products of {merchant} kept being deleted while they were written")
    now = timezone.now()
    results, changed, changed_fields = {}, [], set()
    for sku in skus:
        product = products[sku]
        differing = [] if sku in created else _product_changes(product, values[sku])
        if differing:
            for name in differing:
                setattr(product, name, values[sku][name])
            product.updated_at = now
            changed.append(product)
            changed_fields.update(differing)
        results[sku] = UpsertResult(product, sku in created, sku in created or bool(differing))
    if changed:
        Product.objects.bulk_update(changed, [*sorted(changed_fields), "updated_at"])
    return results


def _product_changes(product: Product, values: dict[str, Any]) -> list[str]:
    """The PRODUCT_FIELDS where the stored product differs from `values`: the one change detection of every
    product write (a write that changes nothing must not touch the row, its updated_at or its triggers)."""
    return [name for name in PRODUCT_FIELDS if getattr(product, name) != values[name]]


def _products_insert(*, merchant: Merchant, values: dict[str, dict[str, Any]]) -> set[str]:
    """Insert the products whose sku does not exist yet, in sku order; returns the skus inserted here (a sku a
    concurrent writer inserted first is left to it: ON CONFLICT DO NOTHING). Existing skus are filtered out first
    so that re-imports do not burn ids from the sequence."""
    existing = set(Product.objects.filter(merchant=merchant, sku__in=list(values)).values_list("sku", flat=True))
    new = sorted(sku for sku in values if sku not in existing)
    if not new:
        return set()
    now = timezone.now()
    names = ("merchant", "sku", *PRODUCT_FIELDS, "created_at", "updated_at")
    fields = [Product._meta.get_field(name) for name in names]
    params: list[Any] = []
    for sku in new:
        row = {"merchant": merchant.pk, "sku": sku, **values[sku], "created_at": now, "updated_at": now}
        params.extend(field.get_db_prep_save(row[field.name], connection) for field in fields)
    placeholders = "(" + ", ".join(["%s"] * len(fields)) + ")"
    sql = (
        f"INSERT INTO {Product._meta.db_table} ({', '.join(field.column for field in fields)}) "
        f"VALUES {', '.join([placeholders] * len(new))} ON CONFLICT (merchant_id, sku) DO NOTHING RETURNING sku"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {sku for (sku,) in cursor.fetchall()}


def product_update(*, product: Product, **fields: Any) -> Product:
    """Change some of a product's fields (PRODUCT_FIELDS); deactivating it hides it from search at once (the
    IndexChange trigger records the change for the in-memory indexes)."""
    unknown = set(fields) - set(PRODUCT_FIELDS)
    if unknown:
        raise ValueError(f"not product fields: {sorted(unknown)}")
    current = {name: getattr(product, name) for name in PRODUCT_FIELDS}
    merged = {**current, **fields}
    return product_upsert(merchant=product.merchant, sku=product.sku, **merged).product


def product_delete(*, product: Product) -> None:
    """Delete a product, its images, embeddings and findings (cascade; the trigger records the deletion), and
    its stored files once the deletion has committed."""
    names = list(product.images.values_list("file", flat=True))
    product.delete()
    transaction.on_commit(lambda: _files_delete(names))


@dataclass(frozen=True)
class ImageAddResult:
    image: ProductImage
    created: bool  # False: this product already had this exact file (same sha256): nothing stored or re-embedded


def image_add(
    *, product: Product, data: bytes, position: int = 0, source_url: str = "", enqueue: bool = True
) -> ImageAddResult:
    """Validate an untrusted image, store its re-encoded copy and queue its embedding (after commit).

    Idempotent on the sha256 of the uploaded bytes: the same file for the same product is neither stored again
    nor re-embedded (nor even decoded again: it was validated when first stored). Raises IntakeError for
    unusable input (nothing is stored then). `enqueue=False` leaves queueing to a caller that batches many adds.
    """
    with transaction.atomic():
        # Every writer of a product's images locks the product first (imports do too): the check below cannot race
        # another writer storing the same file.
        Product.objects.select_for_update().get(pk=product.pk)
        existing = ProductImage.objects.filter(product=product, sha256=hashlib.sha256(data).hexdigest()).first()
        if existing is not None:
            if existing.position != position:
                existing.position = position
                existing.save(update_fields=["position"])
            if existing.status == ProductImage.Status.FAILED and enqueue:  # uploaded again: the merchant's retry
                images_embed_retry(image_ids=[existing.pk])
                existing = ProductImage.objects.get(pk=existing.pk)
            return ImageAddResult(existing, False)
        image = image_store(
            product_id=product.pk, validated=image_validate(data), position=position, source_url=source_url
        )
        image.save()
        if enqueue:
            dispatch.embed_images(image_ids=[image.pk])
        return ImageAddResult(image, True)


class ImageNotFailed(Exception):
    """Only a failed image can be retried: one pending or embedded has nothing to retry."""


def image_embed_retry(*, image: ProductImage) -> ProductImage:
    """Give a FAILED image another round of embedding (the merchant API's retry): raises ImageNotFailed otherwise."""
    with transaction.atomic():
        if not images_embed_retry(image_ids=[image.pk]):
            status = ProductImage.objects.filter(pk=image.pk).values_list("status", flat=True).first()
            raise ImageNotFailed(f"only a failed image can be retried; this one is {status}")
    # read again rather than refresh_from_db(), which re-reads the file's dimensions from storage
    return ProductImage.objects.select_related("product").get(pk=image.pk)


def images_embed_retry(*, image_ids: Sequence[int]) -> int:
    """Failed images among these are pending again, their attempt count (catalog.services.embeddings) and error
    cleared, and queued for embedding after commit: an image the worker died on gets EMBED_MAX_ATTEMPTS more
    deliveries, a file that did not decode is read again. Returns how many."""
    with transaction.atomic():
        retried = list(
            ProductImage.objects.select_for_update()
            .filter(pk__in=image_ids, status=ProductImage.Status.FAILED)
            .values_list("pk", flat=True)
        )
        ProductImage.objects.filter(pk__in=retried).update(
            status=ProductImage.Status.PENDING, error="", embed_attempts=0, embed_attempt_by=""
        )
        dispatch.embed_images(image_ids=sorted(retried))
    return len(retried)


def image_store(*, product_id: int, validated: ValidatedImage, position: int = 0, source_url: str = "") -> ProductImage:
    """Write a validated image's re-encoded file to storage; returns the (unsaved) row that points at it.

    Dimensions come from the validation, so the ImageField does not open the file again to read them."""
    return ProductImage(
        product_id=product_id,
        file=image_file_write(validated=validated),
        width=validated.width,
        height=validated.height,
        sha256=validated.sha256,
        size_bytes=len(validated.data),
        position=position,
        source_url=source_url,
    )


def image_file_write(*, validated: ValidatedImage) -> str:
    """Write a validated image's re-encoded (full-size) file to the images' storage; returns its name there."""
    field = ProductImage._meta.get_field("file")
    name = field.generate_filename(None, f"{validated.sha256[:32]}.{validated.extension}")
    return field.storage.save(name, ContentFile(validated.data))


def image_delete(*, image: ProductImage) -> None:
    name = image.file.name
    image.delete()
    transaction.on_commit(lambda: _files_delete([name]))


def _files_delete(names: Sequence[str]) -> None:
    storage = ProductImage._meta.get_field("file").storage
    for name in names:
        # Another product may hold the same bytes under another name, never under this one: safe to remove.
        if name and not ProductImage.objects.filter(file=name).exists():
            storage.delete(name)


def image_fetch(*, url: str) -> bytes:
    """Download an image URL under the fetch policy (within IMAGE_FETCH_DEADLINE_S, all told); private ranges only
    where IMAGE_FETCH_ALLOWED_NETWORKS says."""
    return url_fetch(
        url,
        allowed_networks=tuple(getattr(settings, "IMAGE_FETCH_ALLOWED_NETWORKS", ())),
        deadline=settings.IMAGE_FETCH_DEADLINE_S,
    )


def product_image_add(
    *, product: Product, data: bytes | None = None, url: str = "", position: int = 0
) -> ImageAddResult:
    """One image for one product, uploaded (`data`) or by URL (fetched here: call it from a worker, see
    `image_fetch_request`); validated, deduplicated, embedded after commit."""
    if data is None:
        if not url:
            raise IntakeError("give an image file or an image URL")
        data = image_fetch(url=url)
    return image_add(product=product, data=data, position=position, source_url=url)


def image_fetch_request(*, product: Product, url: str, position: int = 0) -> ImageFetch:
    """Record a request to add an image by URL and have a worker fetch it (after commit); poll the ImageFetch."""
    fetch = ImageFetch.objects.create(product=product, url=url, position=position)
    dispatch.fetch_product_image(fetch_id=fetch.pk)
    return fetch


def image_fetch_run(*, fetch_id: int) -> ImageFetch | None:
    """Fetch, validate and add a requested image (in a worker); the ImageFetch ends DONE with its image, or FAILED
    with the reason. Idempotent: a fetch already finished is left alone. None if its product was deleted."""
    fetch = ImageFetch.objects.select_related("product__merchant").filter(pk=fetch_id).first()
    if fetch is None or fetch.state != ImageFetch.State.PENDING:
        return fetch
    try:
        result = product_image_add(product=fetch.product, url=fetch.url, position=fetch.position)
    except IntakeError as exc:
        image_fetch_fail(fetch_id=fetch_id, error=str(exc))
    except Product.DoesNotExist:
        return None
    else:
        ImageFetch.objects.filter(pk=fetch_id, state=ImageFetch.State.PENDING).update(
            state=ImageFetch.State.DONE, image=result.image, finished_at=timezone.now()
        )
    return ImageFetch.objects.filter(pk=fetch_id).first()


def image_fetch_fail(*, fetch_id: int, error: str) -> None:
    ImageFetch.objects.filter(pk=fetch_id, state=ImageFetch.State.PENDING).update(
        state=ImageFetch.State.FAILED, error=error[:2000], finished_at=timezone.now()
    )
