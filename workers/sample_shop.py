"""The sample shop's products: real Zalando photos from Fashion-MNIST (t10k) and procedurally rendered products,
several photos each, with titles, categories, attributes and prices. Pure data: `manage.py demo_catalog` writes it
through the catalog services.

Uses only the data side of workers.ml (numpy and PIL, no torch), so loading the sample shop does not load the
network.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from workers.ml.datasets.fashion_mnist import CLASSES, load_arrays, on_white, product_masks
from workers.ml.datasets.render import EVAL_FIRST_SEED, product_spec, render_product

logger = logging.getLogger(__name__)

FASHION_MNIST_SHARE = 0.6  # of the sample products: real photos are what the page is for; the rest are rendered
FASHION_MNIST_SIZE = 112  # the 28-px photos are upscaled 4x so the page shows something a shopper can see
PHOTOS_PER_PRODUCT = 3  # catalog photos of each product: "products, not images" needs several per product
RENDER_SIZE = 128  # the renderer's default detail level
FASHION_MERCHANT = ("fashion-archive", "Fashion Archive (Fashion-MNIST)")
RENDER_MERCHANT = ("render-studio", "Render Studio")
PRICE_RANGES = {  # EUR, by category: plausible shelf prices so the price filter has something to do
    "bag": (25, 180), "shoe": (30, 160), "sandal": (20, 90), "sneaker": (40, 150), "ankle boot": (60, 220),
    "coat": (70, 300), "dress": (30, 160), "trouser": (25, 120), "trousers": (25, 120),
}  # fmt: skip
DEFAULT_PRICE_RANGE = (15, 90)


@dataclass(frozen=True)
class SampleProduct:
    merchant_slug: str
    sku: str
    title: str
    category: str
    attributes: tuple[str, ...]
    price: Decimal
    photos: Callable[[], list[bytes]]  # rendered on demand: a second run skips products it already has


def sample_products(*, count: int, fashion_mnist_dir: Path | None = None) -> tuple[list[SampleProduct], str]:
    """`count` products (Fashion-MNIST first, then rendered) and a note on where they came from."""
    wanted_fashion = round(count * FASHION_MNIST_SHARE)
    fashion: list[SampleProduct] = []
    note = ""
    try:
        fashion = list(_fashion_mnist_products(wanted_fashion, root=fashion_mnist_dir))
    except Exception as exc:  # no network, no apt: the demo still works, with rendered products only
        note = f"Fashion-MNIST is unavailable ({exc}); the sample shop has rendered products only"
        logger.warning(note)
    rendered = list(_rendered_products(count - len(fashion)))
    if not note:
        note = f"{len(fashion)} Fashion-MNIST products (t10k) and {len(rendered)} rendered products"
    return fashion + rendered, note


def _fashion_mnist_products(count: int, *, root: Path | None) -> Iterator[SampleProduct]:
    arrays = load_arrays("t10k", root)
    for index in range(min(count, len(arrays.images))):
        pixels = arrays.images[index]
        category = CLASSES[int(arrays.labels[index])].lower()
        tone = _tone(pixels)
        rng = np.random.default_rng([index, 0xFA5])
        yield SampleProduct(
            merchant_slug=FASHION_MERCHANT[0],
            sku=f"FM-{index:05d}",
            title=f"{tone.capitalize()} {category} no. {index}",
            category=category,
            attributes=(f"tone:{tone}",),
            price=_price(category, rng),
            photos=partial(_fashion_photos, pixels),
        )


def _tone(pixels: np.ndarray) -> str:
    product = pixels[pixels > 8]
    mean = float(product.mean()) if product.size else 0.0
    return "dark" if mean < 90 else "light" if mean > 170 else "mid-tone"


def _fashion_photos(pixels: np.ndarray) -> list[bytes]:
    """Three catalog photos of one 28-px product shot: the photo, a tighter crop, and a mirrored one."""
    image, _ = on_white(pixels, product_masks(pixels[None])[0], size=FASHION_MNIST_SIZE)
    inset = FASHION_MNIST_SIZE // 14
    closer = image.crop((inset, inset, FASHION_MNIST_SIZE - inset, FASHION_MNIST_SIZE - inset))
    closer = closer.resize((FASHION_MNIST_SIZE,) * 2, Image.Resampling.BICUBIC)
    return [_png(picture) for picture in (image, closer, ImageOps.mirror(image))][:PHOTOS_PER_PRODUCT]


def _rendered_products(count: int) -> Iterator[SampleProduct]:
    for offset in range(count):
        seed = EVAL_FIRST_SEED + offset  # the renderer's evaluation range: products no training run has seen
        spec = product_spec(seed)
        rng = np.random.default_rng([seed, 0xFA5])
        yield SampleProduct(
            merchant_slug=RENDER_MERCHANT[0],
            sku=f"RS-{offset:05d}",
            title=spec.title,
            category=spec.category,
            attributes=spec.attribute_names,
            price=_price(spec.category, rng),
            photos=partial(_rendered_photos, seed),
        )


def _rendered_photos(seed: int) -> list[bytes]:
    return [_png(render_product(seed, view, RENDER_SIZE).image) for view in range(PHOTOS_PER_PRODUCT)]


def _price(category: str, rng: np.random.Generator) -> Decimal:
    low, high = PRICE_RANGES.get(category, DEFAULT_PRICE_RANGE)
    return Decimal(int(rng.integers(low, high + 1))) - Decimal("0.01")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
