"""The data of the honest retrieval benchmark: shop catalogs and held-out shopper photos (pure, no Django).

A catalog is what a shop uploads: one clean photo per product, the way shops take them (the product on white or a
light plain backdrop, in colour where the data has it): rendered products (colour) and real Zalando photos from
Fashion-MNIST (grey, put on white). Queries are shoppers' photos of catalog products made by
`workers.ml.heldout_queries`, never by the training augmentation. Products of the `validation` split are
disjoint from those of the `test` split (other renderer seeds, the other half of Fashion-MNIST's t10k), so a
recipe chosen on validation numbers is reported on test numbers it never saw. Neither split overlaps training
(renderer seeds 0.., Fashion-MNIST `train`).

The real-photo set (`real_products`) adds products whose query is a real second photograph
(`real_photos.PAIRS`): they join the test catalog and are reported apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from workers.ml.datasets.fashion_mnist import CLASSES, load_arrays, on_white, product_masks
from workers.ml.datasets.real_photos import real_photo_pairs
from workers.ml.datasets.render import product_spec, render_product
from workers.ml.heldout_queries import HeldoutStrength, heldout_query

SPLITS = ("validation", "test")
RENDER_FIRST_SEED = {"validation": 30_000_000, "test": 40_000_000}  # training 0.., evaluation 10M.., demo 20M..
SEEDS_PER_CATALOG = 1_000_000  # catalog seed s of a split uses renderer seeds FIRST + s * this + i
FASHION_MNIST_HALF = {"validation": (0, 5_000), "test": (5_000, 10_000)}  # t10k indices of each split
CATALOG_PHOTO_SIZE = 256  # px: a shop's product photo (the encoder resizes anyway)
OCCLUDER_CHOICES = 2  # other catalog products a query may lie among


@dataclass(frozen=True)
class BenchmarkProduct:
    sku: str
    title: str
    category: str
    attributes: tuple[str, ...]
    source: str  # rendered | fashion-mnist | real
    photo: Image.Image  # the catalog photo (RGB)
    mask: Image.Image | None = None  # "L", 255 on the product, when known


@dataclass(frozen=True)
class BenchmarkQuery:
    product_index: int  # into the catalog
    source: str
    photo: Image.Image


def benchmark_catalog(
    *, size: int, split: str, seed: int, fashion_mnist_share: float = 0.5, fashion_mnist_dir: Path | None = None
) -> list[BenchmarkProduct]:
    """`size` products of `split`: rendered and Fashion-MNIST, a seeded choice that differs per `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    fashion = _fashion_mnist(round(size * fashion_mnist_share), split=split, seed=seed, root=fashion_mnist_dir)
    rendered = _rendered(size - len(fashion), split=split, seed=seed)
    return rendered + fashion


def _rendered(count: int, *, split: str, seed: int) -> list[BenchmarkProduct]:
    products = []
    first = RENDER_FIRST_SEED[split] + seed * SEEDS_PER_CATALOG
    for offset in range(count):
        spec = product_spec(first + offset)
        record = render_product(spec, 0, CATALOG_PHOTO_SIZE)
        products.append(
            BenchmarkProduct(
                sku=f"R{spec.seed}",
                title=spec.title,
                category=spec.category,
                attributes=tuple(spec.attribute_names),
                source="rendered",
                photo=record.image.convert("RGB"),
                mask=record.extra.get("mask"),
            )
        )
    return products


def _fashion_mnist(count: int, *, split: str, seed: int, root: Path | None) -> list[BenchmarkProduct]:
    if count <= 0:
        return []
    arrays = load_arrays("t10k", root)
    low, high = FASHION_MNIST_HALF[split]
    rng = np.random.default_rng([seed, 0xBE4C])
    chosen = np.sort(rng.choice(np.arange(low, high), size=min(count, high - low), replace=False))
    masks = product_masks(arrays.images[chosen])
    products = []
    for index, mask in zip(chosen, masks):
        name = CLASSES[int(arrays.labels[index])]
        photo, photo_mask = on_white(arrays.images[index], mask, size=CATALOG_PHOTO_SIZE)
        products.append(
            BenchmarkProduct(
                sku=f"FM-{int(index):05d}",
                title=f"{name} no. {int(index)}",
                category=name.lower(),
                attributes=(),
                source="fashion-mnist",
                photo=photo,
                mask=photo_mask,
            )
        )
    return products


def real_products(directory: Path | None = None) -> tuple[list[BenchmarkProduct], list[Image.Image]]:
    """The real-photo set: products whose catalog photo is the first photograph, and their real queries."""
    products, queries = [], []
    for pair, catalog_photo, query_photo in real_photo_pairs(directory):
        products.append(
            BenchmarkProduct(
                sku=f"REAL-{pair.name}",
                title=pair.what,
                category="real",
                attributes=(),
                source="real",
                photo=catalog_photo,
            )
        )
        queries.append(query_photo)
    return products, queries


def benchmark_queries(
    catalog: Sequence[BenchmarkProduct],
    *,
    count: int,
    seed: int,
    strength: HeldoutStrength | str,
    backgrounds: Sequence[Image.Image] = (),
) -> list[BenchmarkQuery]:
    """`count` held-out shopper photos of distinct synthetic-or-Fashion-MNIST catalog products (seeded)."""
    candidates = [i for i, product in enumerate(catalog) if product.source != "real"]
    rng = np.random.default_rng([seed, 0x9E7])
    chosen = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
    queries = []
    for index in chosen:
        product = catalog[int(index)]
        others = rng.choice(candidates, size=OCCLUDER_CHOICES, replace=False)
        photo = heldout_query(
            product.photo,
            np.random.default_rng([seed, int(index)]),
            mask=product.mask,
            occluders=[catalog[int(o)].photo for o in others if int(o) != int(index)],
            backgrounds=backgrounds,
            strength=strength,
        )
        queries.append(BenchmarkQuery(product_index=int(index), source=product.source, photo=photo))
    return queries
