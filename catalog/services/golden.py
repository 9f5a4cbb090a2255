"""The golden set: real shopper photos of known products (GoldenQuery, added by staff), and the numbers each model
version scores on it (with held-out views of the catalog's own products) under `ModelVersion.metrics["golden"]`.
The evaluation itself runs in a worker (workers.pipelines.version_evaluate_golden): it needs the network."""

from __future__ import annotations

from typing import Any

import numpy as np
from django.core.files.base import ContentFile
from django.db import transaction

from catalog import dispatch
from catalog.intake.images import image_validate
from catalog.models import GoldenQuery, ModelVersion, Product

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
)


def golden_query_add(*, product: Product, photo: bytes, source: str = "admin") -> GoldenQuery:
    """Store a shopper photo of `product`, validated and re-encoded like any query photo (an upload is untrusted,
    and re-encoding drops its metadata: a phone photo's EXIF may say where the shopper lives). Raises IntakeError."""
    validated = image_validate(photo)
    query = GoldenQuery(product=product, source=source)
    query.photo.save(f"{product.pk}.{validated.extension}", ContentFile(validated.data), save=False)
    query.save()
    return query


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


def match_confidence(version: ModelVersion, score: float) -> float | None:
    """The calibrated probability that a result with this score (the search's fused score) is the same product,
    from the version's golden-set calibration; None if the version has none yet."""
    calibration = (version_golden(version) or {}).get("calibration") or {}
    if not calibration.get("scores"):
        return None
    return float(np.interp(score, calibration["scores"], calibration["confidences"]))


def match_label(confidence: float | None) -> str:
    """What a result shows: "exact match" or "similar" ("" when the version is not calibrated)."""
    if confidence is None:
        return ""
    return "exact match" if confidence >= EXACT_MATCH_CONFIDENCE else "similar"
