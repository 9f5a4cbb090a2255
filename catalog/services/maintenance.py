"""Periodic clean-up: stored files no row points at any more, the index change log's old rows, and work a lost
worker left stuck."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import Max
from django.utils import timezone

from catalog import dispatch, selectors
from catalog.models import ImportJob, IndexChange, ModelVersion, ProductImage
from catalog.services import imports

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


# Work a worker took and then lost (killed, out of memory, a host gone) stays with the broker for its visibility
# timeout: an hour with Redis. The sweeper (beat, every STUCK_SWEEP_INTERVAL_S) hands it out again once it has been
# stuck STUCK_AFTER_S, longer than any live task may run (import chunk: 360 s hard limit; embed batch: 300 s), so a
# task still running is never doubled. Recovery time: at most STUCK_AFTER_S + STUCK_SWEEP_INTERVAL_S = 8 minutes.
STUCK_AFTER_S = 420
STUCK_SWEEP_INTERVAL_S = 60


def stuck_work_sweep(*, stuck_after_s: float = STUCK_AFTER_S) -> dict[str, int]:
    """Re-queue import chunks of jobs that made no progress for `stuck_after_s`, and images still waiting for an
    embedding (pending, or missing for the version being indexed) that long; and finish an indexing version that
    has every embedding but is still indexing (its polling task, held unacknowledged by a lost worker, would come
    back only after the broker's visibility timeout). Only while the `embed` queue is empty: with a backlog, what
    waits may simply be queued (the sweep after it drains re-queues what is really lost). Every task is idempotent,
    so the worst case is one batch embedded twice, or a version activated by two finishing tasks."""
    if dispatch.queue_length(dispatch.EMBED_IMAGES.queue) > 0:
        return {"chunks": 0, "images": 0, "finishing": 0, "backlog": 1}
    cutoff = timezone.now() - timedelta(seconds=stuck_after_s)
    chunks = 0
    live_jobs = ImportJob.objects.filter(state__in=[ImportJob.State.PENDING, ImportJob.State.RUNNING])
    for job in live_jobs.filter(created_at__lt=cutoff).annotate(last_chunk=Max("chunks__finished_at")):
        last_progress = max(moment for moment in (job.created_at, job.started_at, job.last_chunk) if moment)
        if last_progress < cutoff:
            chunks += imports.import_job_resume(job=job)
    waiting = set(
        ProductImage.objects.filter(status=ProductImage.Status.PENDING, created_at__lt=cutoff).values_list(
            "id", flat=True
        )
    )
    finishing = 0
    indexing = ModelVersion.objects.filter(status=ModelVersion.Status.INDEXING).first()
    if indexing is not None:
        missing = selectors.images_missing_embedding(version=indexing)
        waiting |= set(missing.filter(created_at__lt=cutoff).values_list("id", flat=True))
        if not missing.exists():
            dispatch.finish_indexing(version_id=indexing.pk)
            finishing = 1
    dispatch.embed_images(image_ids=sorted(waiting))
    return {"chunks": chunks, "images": len(waiting), "finishing": finishing, "backlog": 0}
