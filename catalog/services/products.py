"""Products and their images, one at a time: what the merchant API, the admin and the demo catalog write through.

An image is validated, stored once per product (by the sha256 of the uploaded file) and queued for embedding after
commit. Imports write the same rows in bulk (catalog.services.imports), with the same field mapping.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction

from catalog import dispatch, intake
from catalog.models import Merchant, Product, ProductImage


@dataclass(frozen=True)
class UpsertResult:
    product: Product
    created: bool
    changed: bool  # False when the same data was written again (idempotent re-upload)


PRODUCT_FIELDS = ("title", "description", "category", "attributes", "price", "url", "active")


def product_upsert(
    *,
    merchant: Merchant,
    sku: str,
    title: str,
    description: str = "",
    category: str = "",
    attributes: Sequence[str] = (),
    price: Decimal | None = None,
    url: str = "",
    active: bool = True,
) -> UpsertResult:
    """Create or update the product (merchant, sku); writes nothing when nothing changed."""
    values = product_values(
        title=title,
        description=description,
        category=category,
        attributes=attributes,
        price=price,
        url=url,
        active=active,
    )
    with transaction.atomic():
        product = Product.objects.select_for_update().filter(merchant=merchant, sku=sku).first()
        if product is None:
            return UpsertResult(Product.objects.create(merchant=merchant, sku=sku, **values), True, True)
        changed = [name for name in PRODUCT_FIELDS if getattr(product, name) != values[name]]
        for name in changed:
            setattr(product, name, values[name])
        if changed:
            product.save(update_fields=[*changed, "updated_at"])
        return UpsertResult(product, False, bool(changed))


def product_values(
    *,
    title: str,
    description: str = "",
    category: str = "",
    attributes: Sequence[str] = (),
    price: Decimal | None = None,
    url: str = "",
    active: bool = True,
) -> dict[str, Any]:
    """A product's PRODUCT_FIELDS in stored form: what `product_upsert` compares and writes."""
    return {
        "title": title,
        "description": description,
        "category": category,
        "attributes": sorted(set(attributes)),
        "price": None if price is None else Decimal(price).quantize(Decimal("0.01")),
        "url": url,
        "active": active,
    }


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
    nor re-embedded (nor even decoded again: it was validated when first stored). Raises intake.IntakeError for
    unusable input (nothing is stored then). `enqueue=False` leaves queueing to a caller that batches many adds.
    """
    existing = ProductImage.objects.filter(product=product, sha256=hashlib.sha256(data).hexdigest()).first()
    if existing is not None:
        if existing.position != position:
            existing.position = position
            existing.save(update_fields=["position"])
        return ImageAddResult(existing, False)
    image = image_store(
        product_id=product.pk, validated=intake.image_validate(data), position=position, source_url=source_url
    )
    image.save()
    if enqueue:
        dispatch.embed_images(image_ids=[image.pk])
    return ImageAddResult(image, True)


def image_store(
    *, product_id: int, validated: intake.ValidatedImage, position: int = 0, source_url: str = ""
) -> ProductImage:
    """Write a validated image's re-encoded file to storage; returns the (unsaved) row that points at it.

    Dimensions come from the validation, so the ImageField does not open the file again to read them."""
    field = ProductImage._meta.get_field("file")
    name = field.generate_filename(None, f"{validated.sha256[:32]}.{validated.extension}")
    stored = field.storage.save(name, ContentFile(validated.data))
    return ProductImage(
        product_id=product_id,
        file=stored,
        width=validated.width,
        height=validated.height,
        sha256=validated.sha256,
        size_bytes=len(validated.data),
        position=position,
        source_url=source_url,
    )


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
    """Download an image URL under the fetch policy; private ranges only where IMAGE_FETCH_ALLOWED_NETWORKS says."""
    return intake.url_fetch(url, allowed_networks=tuple(getattr(settings, "IMAGE_FETCH_ALLOWED_NETWORKS", ())))


def product_image_add(
    *, product: Product, data: bytes | None = None, url: str = "", position: int = 0
) -> ImageAddResult:
    """One image for one product, uploaded (`data`) or by URL; validated, deduplicated, embedded after commit."""
    if data is None:
        if not url:
            raise intake.IntakeError("give an image file or an image URL")
        data = image_fetch(url=url)
    return image_add(product=product, data=data, position=position, source_url=url)
