"""Embeddings: one row per image and model version (its code, fc7 and predictions), written in batches by the
embed workers, and the duplicate report their codes feed (near-identical images of different products)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from django.db import connection, transaction

from catalog.codes import bits_to_bitstring, code_sql, version_sql
from catalog.models import DuplicateFinding, ImageEmbedding, ImageKeypoints, ModelVersion, ProductImage

# Near-identical = both thresholds. Measured with version 0 on 2,000 distinct rendered products (2M pairs): no
# distinct pair passes, while exact copies, 98% of resized copies and ~25% of JPEG re-compressions (q50-70) do;
# at fc7 0.20 re-compressions rise to ~50% but distinct pairs start to pass. A wrong "copy" costs more than a miss.
DUPLICATE_MAX_HAMMING_FRACTION = 0.10  # codes of copies differ in <=5 of 64 bits at p95; codes alone collide

DUPLICATE_MAX_FC7_DISTANCE = 0.15  # L2 between unit fc7 vectors; nearest distinct product: p1 0.35, min 0.25

# Nearest codes examined per new image: a copy is within 1-2 bits, but 64-bit codes of distinct products crowd that
# radius too (~3 neighbours within 2 bits at p95 in 2,000 products, ~15 expected at 10,000), so look past it. At 64
# the planner left the HNSW index for a scan + sort per image (10 ms/image at 10k images, against 0.4 ms at 32).
DUPLICATE_CANDIDATES = 32


def embedding_row(
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
    """An unsaved embedding row of `image` under `model_version` (sizes are checked when it is saved)."""
    return ImageEmbedding(
        image=image,
        model_version=model_version,
        product_id=image.product_id,
        code=bits_to_bitstring(bits),
        fc7=np.asarray(fc7, dtype=np.float32).reshape(-1),
        category=category,
        category_confidence=category_confidence,
        attributes=attributes or {},
        landmarks=[list(map(float, point)) for point in (landmarks or [])],
    )


def embeddings_bulk_save(*, model_version: ModelVersion, rows: Sequence[ImageEmbedding]) -> None:
    """Insert or replace many embeddings of one version in one statement (idempotent: re-embedding an image is an
    update; one round trip per batch instead of two or three per image)."""
    for row in rows:
        if len(row.code) != model_version.code_bits or len(row.fc7) != model_version.fc7_dim:
            raise ValueError(
                f"version {model_version.pk} expects {model_version.code_bits} bits and {model_version.fc7_dim}-d fc7,"
                f" got {len(row.code)} bits and {len(row.fc7)}-d"
            )
    ImageEmbedding.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["image", "model_version"],
        update_fields=["product", "code", "fc7", "category", "category_confidence", "attributes", "landmarks"],
    )


def duplicates_find(*, model_version: ModelVersion, image_ids: Sequence[int]) -> int:
    """Record near-identical images of other products for these images' embeddings under `model_version`.

    Candidates come from the version's Hamming index (nearest codes), then both thresholds must hold. A finding
    is stored in both directions so each merchant sees it about its own image. Returns findings created.
    """
    if not image_ids:
        return 0
    bits = int(model_version.code_bits)
    max_hamming = int(bits * DUPLICATE_MAX_HAMMING_FRACTION)
    # The partial HNSW index (code_index_ensure) serves only the exact expressions catalog.codes writes.
    hamming = f"{code_sql('e.code', bits)} <~> {code_sql('n.code', bits)}"
    sql = f"""
        SELECT n.image_id, np.merchant_id, c.image_id, p.merchant_id, c.hamming, c.distance
        FROM catalog_imageembedding n
        JOIN catalog_product np ON np.id = n.product_id
        CROSS JOIN LATERAL (
            SELECT e.image_id, e.product_id, ({hamming})::int AS hamming, (e.fc7 <-> n.fc7) AS distance
            FROM catalog_imageembedding e
            WHERE {version_sql("e", model_version.pk)} AND e.product_id <> n.product_id
            ORDER BY {hamming}
            LIMIT %s
        ) c
        JOIN catalog_product p ON p.id = c.product_id  -- outside the LATERAL: joins findings, not all candidates
        WHERE {version_sql("n", model_version.pk)} AND n.image_id = ANY(%s)
          AND c.hamming <= %s AND c.distance <= %s
    """
    with transaction.atomic(), connection.cursor() as cursor:
        # HNSW returns at most ef_search rows: a LIMIT beyond it would silently shorten the candidate list.
        cursor.execute(f"SET LOCAL hnsw.ef_search = {2 * DUPLICATE_CANDIDATES}")
        cursor.execute(sql, [DUPLICATE_CANDIDATES, list(image_ids), max_hamming, DUPLICATE_MAX_FC7_DISTANCE])
        pairs = cursor.fetchall()
    findings: dict[tuple[int, int], DuplicateFinding] = {}
    for image_id, merchant_id, other_id, other_merchant_id, hamming, distance in pairs:
        kind = (
            DuplicateFinding.Kind.DUPLICATE_LISTING
            if merchant_id == other_merchant_id
            else DuplicateFinding.Kind.POSSIBLE_COPY
        )
        for own, own_merchant, other in ((image_id, merchant_id, other_id), (other_id, other_merchant_id, image_id)):
            findings[(own, other)] = DuplicateFinding(
                merchant_id=own_merchant,
                image_id=own,
                other_image_id=other,
                model_version=model_version,
                kind=kind,
                hamming=hamming,
                fc7_distance=float(distance),
            )
    existing = DuplicateFinding.objects.filter(model_version=model_version).count()
    DuplicateFinding.objects.bulk_create(findings.values(), ignore_conflicts=True)
    return DuplicateFinding.objects.filter(model_version=model_version).count() - existing


def embeddings_record(
    *,
    model_version: ModelVersion,
    rows: Sequence[ImageEmbedding],
    keypoints: Callable[[], dict[int, tuple[bytes, int]]] | None = None,
) -> int:
    """Save a batch of one version's embeddings and record the duplicates they reveal, in one transaction;
    returns the findings created. With `keypoints`, the local features it returns (as `keypoints_save` takes them)
    are saved in the same transaction; it is called last, so the caller may still be computing them meanwhile."""
    with transaction.atomic():
        embeddings_bulk_save(model_version=model_version, rows=rows)
        found = duplicates_find(model_version=model_version, image_ids=[row.image_id for row in rows])
        if keypoints is not None:
            keypoints_save(packed=keypoints())
        return found


def image_mark_failed(*, image_id: int, error: str) -> None:
    """A stored image that cannot be decoded: marked failed (with why), so nothing retries or waits for it."""
    ProductImage.objects.filter(pk=image_id).update(status=ProductImage.Status.FAILED, error=error[:500])


def keypoints_save(*, packed: dict[int, tuple[bytes, int]]) -> None:
    """Local features of images (image id -> (catalog.geometry.pack() bytes, feature count)), for the search's
    geometric verification. They depend on the image alone: an image that has them keeps the first ones written."""
    ImageKeypoints.objects.bulk_create(
        [ImageKeypoints(image_id=image_id, data=data, features=count) for image_id, (data, count) in packed.items()],
        ignore_conflicts=True,
    )


def images_mark_embedded(*, image_ids: Sequence[int]) -> None:
    ProductImage.objects.filter(pk__in=image_ids).update(status=ProductImage.Status.EMBEDDED, error="")
