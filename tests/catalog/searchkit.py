"""Builders for search tests: a tiny active model version and products whose embeddings are written directly
(real rows in the real PostgreSQL + pgvector; no network involved)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from decimal import Decimal

import numpy as np

from catalog.models import ImageEmbedding, Merchant, ModelVersion, Product
from catalog.services import model_versions
from tests import factories

CODE_BITS = 32
FC7_DIM = 16
_names = itertools.count()


def active_version(*, code_bits: int = CODE_BITS, fc7_dim: int = FC7_DIM) -> ModelVersion:
    version = ModelVersion.objects.create(
        name=f"test-v{next(_names)}-{np.random.default_rng().integers(1 << 30)}",
        code_bits=code_bits,
        fc7_dim=fc7_dim,
        status=ModelVersion.Status.READY,
    )
    return model_versions.model_version_activate(version=version)


def random_bits(rng: np.random.Generator, code_bits: int = CODE_BITS) -> np.ndarray:
    return rng.integers(0, 2, code_bits).astype(bool)


def unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, np.float32)
    return vector / max(float(np.linalg.norm(vector)), 1e-9)


@dataclass
class Planted:
    product: Product
    embeddings: list[ImageEmbedding]


def product_with_embeddings(
    *,
    merchant: Merchant,
    version: ModelVersion,
    sku: str,
    encodings: list[tuple[np.ndarray, np.ndarray]],  # (bits, fc7) per image
    category: str = "",
    attributes: tuple[str, ...] = (),
    price: str | None = "10.00",
    active: bool = True,
    predicted_category: str = "",
) -> Planted:
    product = factories.product(
        merchant,
        sku=sku,
        category=category,
        attributes=sorted(attributes),
        price=None if price is None else Decimal(price),
        active=active,
    )
    saved = []
    for index, (bits, fc7) in enumerate(encodings):
        image = factories.image(product, f"{sku}-{index}-{next(_names)}")
        saved.append(
            factories.embedding(
                image=image,
                model_version=version,
                bits=bits,
                fc7=fc7,
                category=predicted_category,
                landmarks=[[0.2, 0.3, 1.0], [0.7, 0.8, 0.9], [0.5, 0.5, 0.0]],
            )
        )
    return Planted(product=product, embeddings=saved)


def random_catalog(
    *, merchant: Merchant, version: ModelVersion, count: int, seed: int = 0, images: int = 1, **fields
) -> list[Planted]:
    rng = np.random.default_rng(seed)
    return [
        product_with_embeddings(
            merchant=merchant,
            version=version,
            sku=f"{merchant.slug}-R{seed}-{i}",
            encodings=[
                (random_bits(rng, version.code_bits), unit(rng.standard_normal(version.fc7_dim))) for _ in range(images)
            ],
            **fields,
        )
        for i in range(count)
    ]


def flip(bits: np.ndarray, positions: list[int]) -> np.ndarray:
    out = np.array(bits, dtype=bool)
    out[positions] = ~out[positions]
    return out
