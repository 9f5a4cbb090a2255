"""Reads. Keyword-only, typed; views and tasks call these instead of building querysets themselves."""

from __future__ import annotations

from django.db.models import QuerySet

from catalog.models import ModelVersion


def model_version_list() -> QuerySet[ModelVersion]:
    return ModelVersion.objects.all()


def model_version_active() -> ModelVersion | None:
    return ModelVersion.objects.filter(status=ModelVersion.Status.ACTIVE).first()
