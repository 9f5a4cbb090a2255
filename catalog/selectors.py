"""Reads. Keyword-only, typed; views, commands and worker pipelines call these instead of building querysets."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.db.models import Prefetch, Q, QuerySet
from django.db.models.fields.json import KT
from django.utils import timezone
from PIL import Image

from catalog.intake.images import WORK_MAX_SIDE, image_open_downscaled
from catalog.models import (
    DuplicateFinding,
    GoldenQuery,
    ImageEmbedding,
    ImageFetch,
    ImageKeypoints,
    ImportJob,
    Merchant,
    ModelVersion,
    Product,
    ProductImage,
    RecentQuery,
    TrainingRun,
)


def model_version_list() -> QuerySet[ModelVersion]:
    return ModelVersion.objects.all()


def model_version_active() -> ModelVersion | None:
    return ModelVersion.objects.filter(status=ModelVersion.Status.ACTIVE).first()


def model_version_searched() -> ModelVersion | None:
    """The active version as a search reads it, once per query: without its metrics (a search needs only their
    "same product" calibration, which catalog.search keeps per process) but with the time of its golden-set
    evaluation, which tells a process that its kept calibration is stale."""
    return (
        ModelVersion.objects.filter(status=ModelVersion.Status.ACTIVE)
        .defer("metrics")
        .annotate(golden_evaluated_at=KT("metrics__golden__evaluated_at"))
        .first()
    )


def model_version_golden(*, version_id: int) -> dict[str, Any] | None:
    """A version's golden-set numbers alone (metrics["golden"]), read without the rest of its metrics."""
    numbers = ModelVersion.objects.filter(pk=version_id).values_list("metrics__golden", flat=True).first()
    return numbers if isinstance(numbers, dict) else None


def model_versions_serving() -> QuerySet[ModelVersion]:
    """Versions whose embeddings must be kept complete: the active one and one being indexed to replace it."""
    return ModelVersion.objects.filter(status__in=[ModelVersion.Status.ACTIVE, ModelVersion.Status.INDEXING])


def model_version_get(*, version_id: int) -> ModelVersion:
    return ModelVersion.objects.get(pk=version_id)


def checkpoint_path(*, version: ModelVersion) -> Path:
    """Where the version's network is stored (a relative checkpoint is under MODELS_DIR)."""
    path = Path(version.checkpoint)
    return path if path.is_absolute() else Path(settings.MODELS_DIR) / path


def images_missing_embedding(*, version: ModelVersion) -> QuerySet[ProductImage]:
    """Images that `version` has not embedded yet (images that failed to decode are not waited for)."""
    return ProductImage.objects.exclude(status=ProductImage.Status.FAILED).exclude(embeddings__model_version=version)


def images_by_id(*, image_ids: Sequence[int]) -> QuerySet[ProductImage]:
    return ProductImage.objects.filter(id__in=image_ids)


def images_without_keypoints(*, image_ids: Sequence[int]) -> set[int]:
    """Those of these images that have no local features stored yet (catalog.geometry, ImageKeypoints)."""
    have = set(ImageKeypoints.objects.filter(image_id__in=image_ids).values_list("image_id", flat=True))
    return set(image_ids) - have


def _usable_images() -> QuerySet[ProductImage]:
    """Images that have not failed to decode."""
    return ProductImage.objects.exclude(status=ProductImage.Status.FAILED)


def images_usable(*, limit: int, seed: int | None = None) -> list[ProductImage]:
    """Up to `limit` images that have not failed to decode, with their products: the oldest first, or with a
    `seed` a uniform random sample (what a fit needs: the first ids are one merchant's first upload)."""
    usable = _usable_images()
    if seed is None:
        return list(usable.select_related("product").order_by("id")[:limit])
    ids = np.fromiter(usable.values_list("id", flat=True), dtype=np.int64)  # 8 bytes an image: 8 MB at 1M
    chosen = np.random.default_rng(seed).choice(ids, size=min(limit, len(ids)), replace=False)
    return list(usable.filter(id__in=chosen.tolist()).select_related("product").order_by("id"))


def images_usable_count() -> int:
    """Images that have not failed to decode: the catalog a version 0 is fitted on (`images_usable`)."""
    return _usable_images().count()


def image_read(*, image: ProductImage) -> bytes:
    """The stored (validated, re-encoded) file of an image."""
    with image.file.open("rb") as handle:
        return handle.read()


def image_open(*, image: ProductImage, max_side: int = WORK_MAX_SIDE) -> Image.Image:
    """A stored product image as an RGB working copy, longer side at most `max_side` (what encoding and keypoints
    need; the stored file keeps its full size for display)."""
    return image_open_downscaled(image_read(image=image), max_side)


def products_to_train_on() -> Iterator[Product]:
    """Active products with their images that have not failed to decode (as `usable_images`), by id: what a
    retraining run learns from."""
    usable = Prefetch(
        "images", queryset=ProductImage.objects.exclude(status=ProductImage.Status.FAILED), to_attr="usable_images"
    )
    return Product.objects.filter(active=True).prefetch_related(usable).order_by("pk").iterator(chunk_size=500)


def training_run_get(*, run_id: int) -> TrainingRun:
    return TrainingRun.objects.get(pk=run_id)


def training_run_cancel_requested(*, run_id: int) -> bool:
    """Whether the admin has asked this run to stop (read fresh: the flag is set by another process)."""
    return TrainingRun.objects.filter(pk=run_id, cancel_requested=True).exists()


# --- Merchant-scoped reads: every queryset a merchant user sees starts from that user's merchants -----------------


def merchants_for_user(*, user: Any) -> QuerySet[Merchant]:
    if not getattr(user, "is_authenticated", False):
        return Merchant.objects.none()
    return Merchant.objects.filter(users=user)


def product_list_for_user(
    *, user: Any, merchant_slug: str = "", active: bool | None = None, category: str = "", query: str = ""
) -> QuerySet[Product]:
    """The products of the user's merchants (optionally one of them), never anyone else's."""
    products = Product.objects.filter(merchant__in=merchants_for_user(user=user)).select_related("merchant")
    if merchant_slug:
        products = products.filter(merchant__slug=merchant_slug)
    return _product_filter(products, active=active, category=category, query=query).prefetch_related("images")


def _product_filter(products: QuerySet[Product], *, active: bool | None, category: str, query: str) -> QuerySet:
    if active is not None:
        products = products.filter(active=active)
    if category:
        products = products.filter(category=category)
    if query:
        products = products.filter(Q(sku__icontains=query) | Q(title__icontains=query))
    return products


def product_get_for_user(*, user: Any, product_id: int) -> Product | None:
    return product_list_for_user(user=user).filter(pk=product_id).first()


def image_get_for_user(*, user: Any, product_id: int, image_id: int) -> ProductImage | None:
    return (
        ProductImage.objects.filter(
            pk=image_id, product_id=product_id, product__merchant__in=merchants_for_user(user=user)
        )
        .select_related("product__merchant")
        .first()
    )


def image_fetch_get_for_user(*, user: Any, fetch_id: int) -> ImageFetch | None:
    return (
        ImageFetch.objects.filter(pk=fetch_id, product__merchant__in=merchants_for_user(user=user))
        .select_related("product__merchant", "image")
        .first()
    )


def import_job_list_for_user(*, user: Any) -> QuerySet[ImportJob]:
    return ImportJob.objects.filter(merchant__in=merchants_for_user(user=user)).select_related("merchant")


def import_job_get_for_user(*, user: Any, job_id: int) -> ImportJob | None:
    return import_job_list_for_user(user=user).filter(pk=job_id).first()


@dataclass(frozen=True)
class ImportProgress:
    total: int
    processed: int
    ok: int
    rejected: int
    percent: float
    rows_per_second: float | None
    eta_seconds: float | None  # None until there is a rate to extrapolate from, 0 when done
    images_new: int
    images_pending: int  # images of this merchant still waiting for their embedding


def import_job_progress(*, job: ImportJob) -> ImportProgress:
    """Live progress: counts, rate and ETA from the rows already committed since the job started."""
    rate = eta = None
    if job.state == ImportJob.State.DONE:
        eta = 0.0
    if job.started_at:
        end = job.finished_at or timezone.now()
        elapsed = max((end - job.started_at).total_seconds(), 1e-3)
        rate = job.processed / elapsed if job.chunks_done else None  # rows rejected at upload are not a rate yet
        if rate and job.state != ImportJob.State.DONE:
            eta = round((job.total - job.processed) / rate, 1)
    pending = ProductImage.objects.filter(
        product__merchant_id=job.merchant_id, status=ProductImage.Status.PENDING
    ).count()
    return ImportProgress(
        total=job.total,
        processed=job.processed,
        ok=job.ok,
        rejected=job.rejected,
        percent=round(100.0 * job.processed / job.total, 1) if job.total else 100.0,
        rows_per_second=None if rate is None else round(rate, 1),
        eta_seconds=eta,
        images_new=job.images_new,
        images_pending=pending,
    )


def import_job_rejected_rows(*, job: ImportJob) -> list[dict[str, Any]]:
    """The job's rejected rows (at upload and while importing), by line: what the merchant fixes and uploads
    again."""
    errors = list(job.errors)
    for chunk_errors in job.chunks.exclude(rejected=0).values_list("errors", flat=True):
        errors.extend(chunk_errors)
    return sorted(errors, key=lambda error: error.get("line", 0))


def duplicate_findings_for_user(*, user: Any, kind: str = "") -> QuerySet[DuplicateFinding]:
    """Findings about the user's merchants' own images under the active version (the other side of a possible
    copy stays hidden: serializers show it only for the merchant's own products)."""
    findings = DuplicateFinding.objects.filter(
        merchant__in=merchants_for_user(user=user), model_version__status=ModelVersion.Status.ACTIVE
    ).select_related("image__product", "other_image__product")
    if kind:
        findings = findings.filter(kind=kind)
    return findings


def merchant_for_user(*, user: Any, slug: str = "") -> Merchant | None:
    """The merchant a write acts for: the one named, or the user's only one; None if that is not determined."""
    merchants = merchants_for_user(user=user)
    if slug:
        return merchants.filter(slug=slug).first()
    first_two = list(merchants[:2])
    return first_two[0] if len(first_two) == 1 else None


@dataclass(frozen=True)
class ShopFacets:
    """What the shopper page offers as filters: categories and merchants that have visible products."""

    categories: list[str]
    merchants: list[Merchant]


def shop_facets() -> ShopFacets:
    visible = Product.objects.filter(active=True)
    categories = sorted(c for c in visible.exclude(category="").values_list("category", flat=True).distinct())
    merchants = list(Merchant.objects.filter(pk__in=visible.values("merchant_id")).order_by("name"))
    return ShopFacets(categories=categories, merchants=merchants)


# --- the golden set (workers.pipelines.version_evaluate_golden) ------------------------------------------------------
@dataclass(frozen=True)
class GoldenProduct:
    """A catalog product whose held-out shopper views join a version's golden set, and the photo they are made of."""

    product_id: int
    merchant_slug: str
    image: ProductImage  # its main image


def golden_products_sample(*, version: ModelVersion, count: int, seed: int) -> list[GoldenProduct]:
    """A seeded sample of the visible products `version` has embedded, each with its main image: the same seed
    over the same catalog gives every version the same products."""
    product_ids = np.fromiter(
        ImageEmbedding.objects.filter(model_version=version, product__active=True)
        .values_list("product_id", flat=True)
        .distinct()
        .order_by("product_id"),
        dtype=np.int64,
    )
    if not len(product_ids):
        return []
    chosen = np.sort(np.random.default_rng(seed).choice(product_ids, size=min(count, len(product_ids)), replace=False))
    images = (
        ProductImage.objects.filter(product_id__in=chosen.tolist())
        .exclude(status=ProductImage.Status.FAILED)
        .select_related("product__merchant")
        .order_by("product_id", "position", "id")
    )
    main: dict[int, ProductImage] = {}
    for image in images:
        main.setdefault(image.product_id, image)
    return [GoldenProduct(pid, main[pid].product.merchant.slug, main[pid]) for pid in chosen.tolist() if pid in main]


def golden_queries_usable() -> QuerySet[GoldenQuery]:
    """Shopper photos of products that are still visible (a hidden product cannot be found, by design)."""
    return GoldenQuery.objects.filter(product__active=True).select_related("product__merchant").order_by("id")


def product_categories(*, product_ids: Sequence[int]) -> dict[int, str]:
    """Product id -> its catalog category, for the golden set's per-category numbers."""
    return dict(Product.objects.filter(id__in=list(product_ids)).values_list("id", "category"))


def product_merchant_skus(*, product_ids: Sequence[int]) -> dict[int, tuple[int, str]]:
    """Product id -> (merchant id, sku): what names a product in a training export and the golden set's split."""
    rows = Product.objects.filter(id__in=list(product_ids)).values_list("id", "merchant_id", "sku")
    return {pk: (merchant_id, sku) for pk, merchant_id, sku in rows}


def recent_queries() -> QuerySet[RecentQuery]:
    """The recent-query sample (kept only where the shops allow it), oldest first."""
    return RecentQuery.objects.order_by("created_at", "id")


def embedding_products(*, embedding_ids: Sequence[int]) -> dict[int, int]:
    """Embedding id -> product id, for per-stage recall (was the product among the coarse candidates?)."""
    return dict(ImageEmbedding.objects.filter(id__in=list(embedding_ids)).values_list("id", "product_id"))
