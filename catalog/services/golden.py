"""The golden set: real shopper photos of known products (GoldenQuery: added by staff, or a shopper's "this is the
one" with consent), and the numbers each model version scores on it (with held-out views of the catalog's own
products) under `ModelVersion.metrics["golden"]`, its "same product" calibration among them; and the sample of
recent shopper searches (RecentQuery) a candidate's results are compared on. The evaluation itself runs in a worker
(workers.pipelines.version_evaluate_golden): it needs the network."""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction
from django.utils import timezone

from catalog import dispatch
from catalog.intake.images import ValidatedImage, crop_box_apply, image_validate
from catalog.models import GoldenQuery, Merchant, ModelVersion, Product, RecentQuery

GOLDEN_METRICS_KEY = "golden"  # ModelVersion.metrics[...] holding the golden-set numbers
GOLDEN_RANKING_METRIC = "r1"  # what "scores worse" means when switching (catalog.services.model_versions)


GOLDEN_NUMBERS = (  # (key, label, format) of a version's golden-set numbers, as the admin and the commands show them
    ("queries", "queries", "{}"),
    ("r1", "R@1", "{:.1%}"),
    ("r10", "R@10", "{:.1%}"),
    ("map10", "mAP@10", "{:.3f}"),
    ("coarse_recall", "in coarse candidates", "{:.1%}"),
    ("final_recall", "in final top 10", "{:.1%}"),
    ("encode_ms_p50", "encode ms p50", "{:.1f}"),
    ("encode_ms_p95", "encode ms p95", "{:.1f}"),
    ("calibration_ece", "calibration ECE", "{:.3f}"),  # of the "same product" confidence
    ("landmark_pck", "landmark PCK@0.1 (held-out renders)", "{:.1%}"),  # the landmark branch, where there is one
)


def golden_query_add(*, product: Product, photo: bytes, source: str = "admin", consented: bool = False) -> GoldenQuery:
    """Store a shopper photo of `product`, validated and re-encoded like any query photo (an upload is untrusted,
    and re-encoding drops its metadata: a phone photo's EXIF may say where the shopper lives). Raises IntakeError."""
    return golden_query_store(product=product, validated=image_validate(photo), source=source, consented=consented)


def golden_query_store(
    *, product: Product, validated: ValidatedImage, source: str = "admin", consented: bool = False
) -> GoldenQuery:
    """Store a photo `image_validate` has already checked and re-encoded (the admin's form validates it to show
    the error beside the field, and so does not pay for a second decode and re-encode)."""
    query = GoldenQuery(product=product, source=source, consented_at=timezone.now() if consented else None)
    query.photo.save(f"{product.pk}.{validated.extension}", ContentFile(validated.data), save=False)
    query.save()
    return query


CATEGORY_NUMBERS = (("r1", "R@1"), ("r10", "R@10"))  # what the compare page and compare_versions show per category


@dataclass(frozen=True)
class CategoryRow:
    category: str
    queries: int  # golden queries of this category (the candidate's count; the same set for every version)
    numbers: list[dict[str, float | None]]  # per version compared: {"r1": ..., "r10": ...}, None where not measured


def golden_by_category(versions: Sequence[ModelVersion]) -> list[CategoryRow]:
    """The versions' R@1 and R@10 per category of the product sought, side by side, largest categories first."""
    grouped = [(version_golden(version) or {}).get("by_category") or {} for version in versions]
    categories = sorted(
        {category for numbers in grouped for category in numbers},
        key=lambda category: (-max(int((n.get(category) or {}).get("queries", 0)) for n in grouped), category),
    )
    return [
        CategoryRow(
            category=category,
            queries=max(int((n.get(category) or {}).get("queries", 0)) for n in grouped),
            numbers=[{key: (n.get(category) or {}).get(key) for key, _ in CATEGORY_NUMBERS} for n in grouped],
        )
        for category in categories
    ]


class ShopperPhotoRefused(PermissionError):
    """The shop does not keep shoppers' photos (Merchant.golden_from_shoppers is off)."""


def golden_query_from_shopper(
    *, product_id: int, photo: bytes, consent: bool, box: tuple[float, float, float, float] | None = None
) -> GoldenQuery:
    """A shopper's "this is the one" on a result: their photo (cropped to the box they searched with) becomes a
    golden query of that product, only with their consent and only if the product's shop keeps shoppers' photos
    (kept for the shop's retention, catalog.services.maintenance.shopper_photos_expire). Raises ValueError without
    consent, Product.DoesNotExist for a product that cannot be searched, ShopperPhotoRefused, IntakeError."""
    if not consent:
        raise ValueError("a shopper's photo is kept only with their consent")
    product = Product.objects.select_related("merchant").get(pk=product_id, active=True)
    if not product.merchant.golden_from_shoppers:
        raise ShopperPhotoRefused(f"{product.merchant.name} does not keep shoppers' photos")
    data = _searched_photo(photo, box)
    return golden_query_add(product=product, photo=data, source=str(GoldenQuery.Source.SHOPPER), consented=True)


def _searched_photo(photo: bytes, box: tuple[float, float, float, float] | None) -> bytes:
    """The photo as the search saw it: validated and re-encoded (no metadata survives), cropped to the box."""
    validated = image_validate(photo)
    if box is None:
        return validated.data
    buffer = io.BytesIO()
    crop_box_apply(validated.image, box).save(buffer, format="PNG")
    return buffer.getvalue()


def recent_query_keep(
    *, photo: bytes, box: tuple[float, float, float, float] | None, merchant_id: int | None
) -> RecentQuery | None:
    """After a shopper's search: keep its photo in the recent-query sample that the compare page runs a candidate
    version on, for a share of searches (settings.RECENT_QUERY_SAMPLE_RATE) and only where the shop allows it: the
    shop the search was scoped to, or every shop for a search of all shops. The sample keeps the newest
    settings.RECENT_QUERIES_MAX (older ones are deleted with their files); retention: shopper_photos_expire."""
    if random.random() >= float(settings.RECENT_QUERY_SAMPLE_RATE):  # noqa: S311 - a sample, not a secret
        return None
    if not recent_queries_allowed(merchant_id=merchant_id):
        return None
    query = RecentQuery(merchant_id=merchant_id)
    query.photo.save("query.png", ContentFile(_searched_photo(photo, box)), save=False)
    query.save()
    photos_delete(list(RecentQuery.objects.order_by("-created_at", "-id")[int(settings.RECENT_QUERIES_MAX) :]))
    return query


def recent_queries_allowed(*, merchant_id: int | None) -> bool:
    shops = Merchant.objects.filter(pk=merchant_id) if merchant_id else Merchant.objects.filter(products__active=True)
    return shops.exists() and not shops.filter(keep_recent_queries=False).exists()


def photos_delete(rows: Sequence[GoldenQuery | RecentQuery]) -> int:
    """Delete shoppers' photo rows, then their files (a file left behind by a failure is an orphan the media sweep
    deletes; a row without its file would break an evaluation)."""
    for model in (GoldenQuery, RecentQuery):
        model.objects.filter(pk__in=[row.pk for row in rows if isinstance(row, model)]).delete()
    for row in rows:
        row.photo.delete(save=False)
    return len(rows)


def version_evaluate(*, version: ModelVersion) -> None:
    """Evaluate `version` on the golden set in a worker (after the current transaction commits)."""
    if not version.checkpoint:
        raise ValueError(f"{version.name} has no checkpoint to evaluate")
    dispatch.evaluate_version(version_id=version.pk)


def version_golden_record(*, version_id: int, numbers: dict[str, Any]) -> ModelVersion:
    """Store a version's golden-set numbers (other metrics on the version are kept)."""
    with transaction.atomic():
        version = ModelVersion.objects.select_for_update().get(pk=version_id)
        version.metrics = {**(version.metrics or {}), GOLDEN_METRICS_KEY: numbers}
        version.save(update_fields=["metrics"])
    return version


def version_golden(version: ModelVersion) -> dict[str, Any] | None:
    """The version's golden-set numbers, or None if it was never evaluated (or its evaluation failed)."""
    numbers = (version.metrics or {}).get(GOLDEN_METRICS_KEY)
    return numbers if isinstance(numbers, dict) and GOLDEN_RANKING_METRIC in numbers else None


EXACT_MATCH_CONFIDENCE = 0.5  # a result more likely than not to be the shopper's product is "exact match"
EXACT_MATCH, SIMILAR = "exact match", "similar"


@dataclass(frozen=True)
class MatchCalibration:
    """A version's "same product" confidence: isotonic knots (score ascending, confidence non-increasing) fitted
    on its golden-set results by workers.pipelines.match_calibration, and their measured calibration error."""

    scores: np.ndarray
    confidences: np.ndarray
    ece: float | None = None

    def confidence(self, score: float) -> float:
        """The probability that a result with this (fused) score is the shopper's product: interpolated between
        the knots, flat beyond them; never increasing in the score."""
        return float(np.interp(score, self.scores, self.confidences))


def match_calibration_of(numbers: dict[str, Any] | None) -> MatchCalibration | None:
    """The calibration in a version's golden-set numbers, or None (never evaluated, or too few results to fit)."""
    calibration = (numbers or {}).get("calibration") or {}
    scores, confidences = calibration.get("scores"), calibration.get("confidences")
    if not scores or not confidences or len(scores) != len(confidences):
        return None
    return MatchCalibration(
        scores=np.asarray(scores, np.float64), confidences=np.asarray(confidences, np.float64),
        ece=calibration.get("ece"),
    )  # fmt: skip


def match_confidence(version: ModelVersion, score: float) -> float | None:
    """The calibrated probability that a result with this score (the search's fused score) is the same product,
    from the version's golden-set calibration; None if the version has none yet."""
    calibration = match_calibration_of(version_golden(version))
    return None if calibration is None else calibration.confidence(score)


def match_label(confidence: float | None) -> str | None:
    """What a result shows: "exact match" or "similar" (None when the version is not calibrated)."""
    if confidence is None:
        return None
    return EXACT_MATCH if confidence >= EXACT_MATCH_CONFIDENCE else SIMILAR
