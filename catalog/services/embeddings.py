"""Embeddings: one row per image and model version (its code, fc7 and predictions), written in batches by the
embed workers, and the duplicate report their codes feed (near-identical images of different products)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Case, F, When
from django.utils import timezone

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
    """Embedded under every serving version: its attempt count starts again (the cap is on deaths in a row)."""
    ProductImage.objects.filter(pk__in=image_ids).update(
        status=ProductImage.Status.EMBEDDED, error="", embed_attempts=0, embed_attempt_by=""
    )


# --- the attempt cap: an image whose embedding keeps killing its worker ----------------------------------------------
# An embed batch is acknowledged late and re-queued when its worker dies (and re-sent by the stuck-work sweeper when
# the hard time limit ended it), so an image that kills the process (out of memory on a huge file, a hang until the
# hard limit) would be handed out forever, and an indexing waiting for it would never finish. Each delivery counts
# an attempt on the images it begins, committed before any file is opened or the network runs; success resets the
# count; a delivery that finds an image begun EMBED_MAX_ATTEMPTS times by deliveries that died gives it up (FAILED,
# with the reason), and so does the sweeper.


@dataclass(frozen=True)
class EmbedDelivery:
    """Which delivery of an embed task is working: its Celery task id and retry number.

    Celery re-runs an embed task in two ways. A redelivery after the worker died carries the same id and retry
    number: it counts a new attempt. A retry after a transient database error (the task's autoretry on
    OperationalError, the only retry it has) carries the same id and retry number + 1: it continues the attempt the
    try before it counted, so a database hiccup never burns an image's attempts. No database write is needed on the
    error path (the database may be what failed): the count is keyed by the delivery that made it."""

    task_id: str
    retries: int = 0

    @property
    def key(self) -> str:
        return f"{self.task_id}:{self.retries}"

    @property
    def continues(self) -> str | None:
        """The key of the try this retry continues, if it is one."""
        return f"{self.task_id}:{self.retries - 1}" if self.retries else None


@dataclass(frozen=True)
class EmbedWork:
    images: list[ProductImage]  # to embed: fewest deaths first
    one_at_a_time: bool  # an earlier delivery died on some of them: count and embed each alone
    given_up: int  # images failed now: begun EMBED_MAX_ATTEMPTS times by deliveries that died


def _deaths(image: ProductImage, delivery: EmbedDelivery | None) -> int:
    """Deliveries that began work on `image` and died (the try this retry continues did not die)."""
    continued = delivery.continues if delivery is not None else None
    return image.embed_attempts - int(continued is not None and image.embed_attempt_by == continued)


def embed_work_claim(
    *, image_ids: Sequence[int], versions: Sequence[ModelVersion], delivery: EmbedDelivery | None = None
) -> EmbedWork:
    """What an embed delivery works on among `image_ids`: images not FAILED and not yet embedded under every one of
    `versions` (a redelivered batch skips what an earlier delivery finished). Images that deliveries which died began
    EMBED_MAX_ATTEMPTS times end FAILED now. If no other image was begun by a delivery that died, the batch is
    embedded whole (one count for all, `embed_attempts_count`); otherwise one image at a time, each counted just
    before it, the fewest deaths first: the image that kills its process is tried last, after the others are saved,
    and only it is charged with the death."""
    images = list(
        ProductImage.objects.filter(pk__in=image_ids).exclude(status=ProductImage.Status.FAILED).order_by("pk")
    )
    have = set(
        ImageEmbedding.objects.filter(image_id__in=[image.pk for image in images], model_version__in=versions)
        .values_list("image_id", "model_version_id")
    )  # fmt: skip
    todo = [
        image
        for image in images
        if image.status != ProductImage.Status.EMBEDDED or any((image.pk, v.pk) not in have for v in versions)
    ]
    cap = settings.EMBED_MAX_ATTEMPTS
    spent = [image.pk for image in todo if _deaths(image, delivery) >= cap]
    given_up = images_embed_give_up(image_ids=spent) if spent else 0
    rest = sorted(
        (image for image in todo if image.pk not in spent), key=lambda image: (_deaths(image, delivery), image.pk)
    )
    return EmbedWork(rest, any(_deaths(image, delivery) > 0 for image in rest), given_up)


def embed_attempts_count(*, image_ids: Sequence[int], delivery: EmbedDelivery | None = None) -> None:
    """Count an attempt on these images, before the delivery opens them (call it outside a transaction: the count
    must survive the process dying). A retry after a database error does not count again what its try counted."""
    bump = F("embed_attempts") + 1
    if delivery is not None and delivery.continues is not None:
        bump = Case(When(embed_attempt_by=delivery.continues, then=F("embed_attempts")), default=bump)
    ProductImage.objects.filter(pk__in=image_ids).exclude(status=ProductImage.Status.FAILED).update(
        embed_attempts=bump,
        embed_attempt_by=delivery.key if delivery is not None else "",
        embed_attempted_at=timezone.now(),
    )


def embed_give_up_reason(attempts: int) -> str:
    return (
        f"could not be embedded: the worker processing it died {attempts} times (out of memory or out of time; the "
        "file may be too large or unusual). Retry it (the merchant API's .../images/<id>/retry/, or upload it again)"
    )


def images_embed_give_up(*, image_ids: Sequence[int] | None = None, attempted_before: datetime | None = None) -> int:
    """End FAILED, with the reason, the images (of `image_ids`, or whose last attempt began before
    `attempted_before`: the sweeper's, long enough ago that it cannot still be running) that deliveries began
    EMBED_MAX_ATTEMPTS times without finishing. Nothing re-queues or waits for a failed image (the sweeper, an
    indexing) until it is retried. Returns how many."""
    cap = settings.EMBED_MAX_ATTEMPTS
    spent = ProductImage.objects.exclude(status=ProductImage.Status.FAILED).filter(embed_attempts__gte=cap)
    if image_ids is not None:
        spent = spent.filter(pk__in=image_ids)
    if attempted_before is not None:
        spent = spent.filter(embed_attempted_at__lt=attempted_before)
    return spent.update(status=ProductImage.Status.FAILED, error=embed_give_up_reason(cap))
