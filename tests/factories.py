"""Small builders of real rows (and real image files) shared by the tests."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
from django.core.files.base import ContentFile
from PIL import Image, ImageDraw

from catalog.models import ImageEmbedding, Merchant, ModelVersion, Product, ProductImage
from catalog.services import embeddings


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def shape_png(
    seed: int, *, ellipse: tuple[int, int] = (30, 34), rectangle: tuple[int, int] = (30, 34), size: int = 64
) -> bytes:
    """A distinct little product shot per seed: a coloured ellipse (odd seeds) or rectangle (even) of the given width
    and height on a light background, for tests that need a network to tell products apart."""
    rng = np.random.default_rng(seed)
    picture = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 255, 3)))
    draw = ImageDraw.Draw(picture)
    colour = tuple(int(v) for v in rng.integers(0, 200, 3))
    x0, y0 = (int(v) for v in rng.integers(4, 24, 2))
    width, height = ellipse if seed % 2 else rectangle
    (draw.ellipse if seed % 2 else draw.rectangle)([x0, y0, x0 + width, y0 + height], fill=colour)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
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


def embedding(
    *, image: ProductImage, model_version: ModelVersion, bits: np.ndarray, fc7: np.ndarray, **predictions: Any
) -> ImageEmbedding:
    """Insert or replace one image's embedding the way the embed worker writes them (embedding_row, then
    embeddings_bulk_save); `predictions`: category, category_confidence, attributes, landmarks."""
    row = embeddings.embedding_row(image=image, model_version=model_version, bits=bits, fc7=fc7, **predictions)
    embeddings.embeddings_bulk_save(model_version=model_version, rows=[row])
    return row
