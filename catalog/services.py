"""Writes. Keyword-only, typed; the one place where catalog rows change (views and tasks call these)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from django.db import connection, transaction
from django.utils import timezone
from pgvector import Bit

from catalog.models import ImageEmbedding, ModelVersion, ProductImage


def code_index_name(version: ModelVersion) -> str:
    return f"catalog_embedding_code_hnsw_v{version.pk}"


def code_index_ensure(*, version: ModelVersion) -> str:
    """Create the version's HNSW index on its codes (bit_hamming_ops) unless it exists.

    Codes are stored unsized because versions differ in code length; pgvector indexes such a column through an
    expression (`code::bit(B)`) on a partial index (`WHERE model_version_id = v`), one per version. Queries must
    use the same expression to use it (catalog.hamming does).
    """
    name = code_index_name(version)
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {name} ON catalog_imageembedding "
            f"USING hnsw ((code::bit({int(version.code_bits)})) bit_hamming_ops) "
            f"WHERE model_version_id = {int(version.pk)}"
        )
    return name


def model_version_activate(*, version: ModelVersion) -> ModelVersion:
    """Make `version` the one search reads, atomically: the previous active version is retired in the same
    transaction, and the partial unique constraint rejects any concurrent second activation."""
    code_index_ensure(version=version)
    with transaction.atomic():
        ModelVersion.objects.select_for_update().filter(status=ModelVersion.Status.ACTIVE).exclude(
            pk=version.pk
        ).update(status=ModelVersion.Status.RETIRED)
        version.status = ModelVersion.Status.ACTIVE
        version.activated_at = timezone.now()
        version.save(update_fields=["status", "activated_at"])
    return version


def embedding_save(
    *,
    image: ProductImage,
    model_version: ModelVersion,
    bits: np.ndarray,
    fc7: np.ndarray,
    category: str = "",
    category_confidence: float | None = None,
    attributes: dict[str, float] | None = None,
    landmarks: Sequence[Sequence[float]] | None = None,
) -> ImageEmbedding:
    """Insert or replace the embedding of `image` under `model_version` (idempotent: re-embedding is an update)."""
    bits = np.asarray(bits, dtype=bool).reshape(-1)
    fc7 = np.asarray(fc7, dtype=np.float32).reshape(-1)
    if bits.size != model_version.code_bits or fc7.size != model_version.fc7_dim:
        raise ValueError(
            f"version {model_version.pk} expects {model_version.code_bits} bits and {model_version.fc7_dim}-d fc7,"
            f" got {bits.size} bits and {fc7.size}-d"
        )
    embedding, _ = ImageEmbedding.objects.update_or_create(
        image=image,
        model_version=model_version,
        defaults={
            "product_id": image.product_id,
            "code": Bit(bits).to_text(),
            "fc7": fc7,
            "category": category,
            "category_confidence": category_confidence,
            "attributes": attributes or {},
            "landmarks": [list(map(float, point)) for point in (landmarks or [])],
        },
    )
    return embedding
