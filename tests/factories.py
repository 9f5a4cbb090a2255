"""Small builders of real rows (and real image files) shared by the tests."""

from __future__ import annotations

import hashlib
import io

from django.core.files.base import ContentFile
from PIL import Image

from catalog.models import Merchant, Product, ProductImage


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def merchant(slug: str = "acme") -> Merchant:
    return Merchant.objects.create(name=slug.title(), slug=slug)


def product(owner: Merchant, sku: str = "A-1", **fields) -> Product:
    fields.setdefault("title", f"Product {sku}")
    return Product.objects.create(merchant=owner, sku=sku, **fields)


def image(owner: Product, name: str, color: tuple[int, int, int] = (200, 30, 30)) -> ProductImage:
    data = png_bytes(color)
    row = ProductImage(product=owner, sha256=hashlib.sha256(data + name.encode()).hexdigest(), size_bytes=len(data))
    row.file.save(f"{name}.png", ContentFile(data), save=False)
    row.save()
    return row
