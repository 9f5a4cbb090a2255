"""Reads. Keyword-only, typed; views and tasks call these instead of building querysets themselves."""

from __future__ import annotations

from django.db.models import QuerySet

from catalog.models import ModelVersion, ProductImage


def model_version_list() -> QuerySet[ModelVersion]:
    return ModelVersion.objects.all()


def model_version_active() -> ModelVersion | None:
    return ModelVersion.objects.filter(status=ModelVersion.Status.ACTIVE).first()


def model_versions_serving() -> QuerySet[ModelVersion]:
    """Versions whose embeddings must be kept complete: the active one and one being indexed to replace it."""
    return ModelVersion.objects.filter(status__in=[ModelVersion.Status.ACTIVE, ModelVersion.Status.INDEXING])


def images_missing_embedding(*, version: ModelVersion) -> QuerySet[ProductImage]:
    """Images that `version` has not embedded yet (images that failed to decode are not waited for)."""
    return ProductImage.objects.exclude(status=ProductImage.Status.FAILED).exclude(embeddings__model_version=version)
