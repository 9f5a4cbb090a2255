"""Ready-made product catalogs and shopper photos for the demo shop, tests and benchmarks (pure, no Django).

    render_catalog(1000, images_per_product=3, seed=0)     -> [CatalogProduct]   colourful rendered products
    fashion_mnist_products("t10k", 1000, 3, seed=0)          -> [CatalogProduct]   real Zalando photos
    shopper_query(image, seed)                               -> PIL image           a shopper photo of it

A `CatalogProduct` has id, category name, attribute names, a title and a list of PIL images; the first image
is the canonical catalog photo, the others are further catalog photos of the same product. Fashion-MNIST
products come from the `t10k` split by default: never from `train`, which is for training only.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from workers.ml.augment import AugmentStrength, shopper_view
from workers.ml.datasets.catalog_export import CatalogProduct
from workers.ml.datasets.fashion_mnist import CLASSES, load_records
from workers.ml.datasets.render import RENDER_SIZE, product_spec, render_product
from workers.ml.records import Record

DEMO_FIRST_SEED = 20_000_000  # demo products are neither training (0...) nor evaluation (10M...) products
SEEDS_PER_DEMO_CATALOG = 1_000_000  # catalog `seed` s uses renderer seeds DEMO_FIRST_SEED + s * this + i
FASHION_MNIST_DISPLAY_SIZE = 112  # 28 px is too small to show on a product page; the encoder resizes anyway
EXTRA_PHOTO_STRENGTH = "catalog"  # further catalog photos of a one-photo product: a slightly different shot


def render_catalog(
    n_products: int, images_per_product: int = 3, seed: int = 0, size: int = RENDER_SIZE
) -> list[CatalogProduct]:
    """`n_products` distinct rendered products, each with `images_per_product` catalog photos (views)."""
    products = []
    for i in range(n_products):
        spec = product_spec(DEMO_FIRST_SEED + seed * SEEDS_PER_DEMO_CATALOG + i)
        images = [render_product(spec, view, size).image for view in range(images_per_product)]
        products.append(
            CatalogProduct(
                id=f"R{spec.seed}",
                category=spec.category,
                attributes=spec.attribute_names,
                title=spec.title,
                images=images,
            )
        )
    return products


def fashion_mnist_products(
    split: str = "t10k",
    n: int = 1000,
    images_per_product: int = 3,
    seed: int = 0,
    root: Path | None = None,
    display_size: int | None = FASHION_MNIST_DISPLAY_SIZE,
) -> list[CatalogProduct]:
    """`n` Fashion-MNIST photos as products (a random, seeded choice from the split).

    Image 0 is the photo itself (upscaled to `display_size`, None keeps 28 px); further images are mild
    re-shoots of it. Fashion-MNIST has no attributes; the category is the class name.
    """
    records = load_records(split, root)
    rng = np.random.default_rng([seed, 0xF4])
    chosen = np.sort(rng.choice(len(records), size=min(n, len(records)), replace=False))
    products = []
    for index in chosen:
        record = records[int(index)]
        if display_size:
            record = _resized(record, display_size)
        images = [record.image] + [
            shopper_view(record, np.random.default_rng([seed, int(index), view]), EXTRA_PHOTO_STRENGTH).image
            for view in range(1, images_per_product)
        ]
        name = CLASSES[record.category]
        products.append(
            CatalogProduct(
                id=f"FM-{split}-{int(index):05d}",
                category=name,
                attributes=(),
                title=f"{name} no. {int(index)}",
                images=images,
            )
        )
    return products


def shopper_query(
    image: Image.Image, seed: int, strength: AugmentStrength | str = "query", mask: Image.Image | None = None
) -> Image.Image:
    """A shopper photo of the product in `image` (deterministic from `seed`).

    With the product's `mask` ("L", 255 on the item) the background behind it may be replaced by clutter;
    without, clutter only fills the border the viewpoint change exposes.
    """
    extra = {"mask": mask.convert("L").resize(image.size)} if mask is not None else {}
    return shopper_view(Record(image=image.convert("RGB"), extra=extra), seed, strength).image


def _resized(record: Record, size: int) -> Record:
    extra = dict(record.extra)
    if "mask" in extra:
        extra["mask"] = extra["mask"].resize((size, size), Image.Resampling.BILINEAR)
    return replace(record, image=record.image.resize((size, size), Image.Resampling.BICUBIC), extra=extra)
