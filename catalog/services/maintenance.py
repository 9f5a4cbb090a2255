"""Periodic clean-up: stored files no row points at any more, shoppers' photos past their shop's retention, the
index change log's old rows, and work a lost worker left stuck."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db.models import Max
from django.utils import timezone

from catalog import dispatch, selectors
from catalog.models import (
    GoldenQuery,
    ImageFetch,
    ImportJob,
    IndexChange,
    Merchant,
    ModelVersion,
    ProductImage,
    RecentQuery,
)
from catalog.services import embeddings, golden, imports

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


def golden_orphans_delete(*, min_age_s: float = MEDIA_ORPHAN_MIN_AGE_S) -> int:
    """Delete shoppers' photos (staff-only storage: golden queries, recent queries) no row points at: their rows
    were deleted by staff, with their product, or by a sweep that failed before their files. Only files older than
    `min_age_s`."""
    storage = GoldenQuery._meta.get_field("photo").storage
    referenced = set(GoldenQuery.objects.values_list("photo", flat=True))
    referenced |= set(RecentQuery.objects.values_list("photo", flat=True))
    cutoff = timezone.now() - timezone.timedelta(seconds=min_age_s)
    deleted = 0
    for name in [*_storage_walk(storage, "golden"), *_storage_walk(storage, "recent")]:
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


def shopper_photos_expire(*, now: datetime | None = None) -> int:
    """Delete the shoppers' photos (golden queries a shopper gave, the recent-query sample) their shop no longer
    keeps: older than its retention, or all of them once it stops keeping them. A sampled search of all shops
    follows the strictest shop. Rows first, then files (golden.photos_delete)."""
    now = now or timezone.now()
    golden_expired, recent_expired = GoldenQuery.objects.none(), RecentQuery.objects.none()
    merchants = list(
        Merchant.objects.only("pk", "golden_from_shoppers", "keep_recent_queries", "shopper_photo_retention_days")
    )
    for merchant in merchants:
        cutoff = now - timedelta(days=merchant.shopper_photo_retention_days)
        given = GoldenQuery.objects.filter(source=GoldenQuery.Source.SHOPPER, product__merchant=merchant)
        golden_expired |= given.filter(created_at__lt=cutoff) if merchant.golden_from_shoppers else given
        sampled = RecentQuery.objects.filter(merchant=merchant)
        recent_expired |= sampled.filter(created_at__lt=cutoff) if merchant.keep_recent_queries else sampled
    of_all_shops = RecentQuery.objects.filter(merchant__isnull=True)
    if merchants and all(merchant.keep_recent_queries for merchant in merchants):
        strictest = min(merchant.shopper_photo_retention_days for merchant in merchants)
        of_all_shops = of_all_shops.filter(created_at__lt=now - timedelta(days=strictest))
    recent_expired |= of_all_shops
    rows = [*golden_expired.only("pk", "photo"), *recent_expired.only("pk", "photo")]
    return golden.photos_delete(rows)


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
    """Re-queue import chunks of jobs that made no progress for `stuck_after_s`, images still waiting for an
    embedding (pending, or missing for the version being indexed) that long, and image fetches by URL still
    pending that long; and finish an indexing version that has every embedding but is still indexing (its polling
    task, held unacknowledged by a lost worker, would come back only after the broker's visibility timeout). Only
    while the `embed` queue is empty: with a backlog, what waits may simply be queued (the sweep after it drains
    re-queues what is really lost). Every task is idempotent, so the worst case is one batch embedded twice, or a
    version activated by two finishing tasks.

    Images whose embedding was begun EMBED_MAX_ATTEMPTS times, the last attempt more than `stuck_after_s` ago (so
    it died: a batch's hard limit is shorter), end FAILED instead of being re-queued (`given_up`): an indexing no
    longer waits for them."""
    if dispatch.queue_length(dispatch.EMBED_IMAGES.queue) > 0:
        return {"chunks": 0, "images": 0, "image_fetches": 0, "finishing": 0, "given_up": 0, "backlog": 1}
    cutoff = timezone.now() - timedelta(seconds=stuck_after_s)
    given_up = embeddings.images_embed_give_up(attempted_before=cutoff)
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
    fetches = list(
        ImageFetch.objects.filter(state=ImageFetch.State.PENDING, created_at__lt=cutoff).values_list("id", flat=True)
    )
    for fetch_id in fetches:
        dispatch.fetch_product_image(fetch_id=fetch_id)
    return {
        "chunks": chunks,
        "images": len(waiting),
        "image_fetches": len(fetches),
        "finishing": finishing,
        "given_up": given_up,
        "backlog": 0,
    }
