"""Periodic clean-up: stored files no row points at any more, and the index change log's old rows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from catalog.models import ImportJob, IndexChange, ProductImage

MEDIA_ORPHAN_MIN_AGE_S = 3600  # younger files may belong to a chunk still in its transaction


def media_orphans_delete(*, min_age_s: float = MEDIA_ORPHAN_MIN_AGE_S) -> int:
    """Delete stored image and upload files no row points at (left by a worker killed mid-chunk: its rows rolled
    back, its files did not). Only files older than `min_age_s`, so nothing an open transaction may yet commit."""
    storage = ProductImage._meta.get_field("file").storage
    referenced = set(ProductImage.objects.values_list("file", flat=True))
    referenced |= set(ImportJob.objects.exclude(archive="").values_list("archive", flat=True))
    cutoff = timezone.now() - timezone.timedelta(seconds=min_age_s)
    deleted = 0
    for top in ("products", "imports"):
        for name in _storage_walk(storage, top):
            if name not in referenced and storage.get_modified_time(name) < cutoff:
                storage.delete(name)
                deleted += 1
    return deleted


def _storage_walk(storage: Any, directory: str) -> list[str]:
    if not storage.exists(directory):
        return []
    folders, files = storage.listdir(directory)
    names = [f"{directory}/{name}" for name in files]
    for folder in folders:
        names.extend(_storage_walk(storage, f"{directory}/{folder}"))
    return names


INDEX_CHANGE_RETENTION = timedelta(days=1)  # in-memory indexes poll on every search; one asleep longer reloads


def index_changes_prune(*, older_than: timedelta = INDEX_CHANGE_RETENTION) -> int:
    """Delete change-log rows older than `older_than` (the log only notifies; the catalog rows are the truth).
    An in-memory index that had not read them yet notices the hole and reloads (catalog.hamming)."""
    deleted, _ = IndexChange.objects.filter(created_at__lt=timezone.now() - older_than).delete()
    return deleted
