"""Celery tasks: thin. Each takes primary keys (or the query photo as catalog.query_payload sends it) and calls
one pipeline (workers.pipelines) or service. Retries, time limits and queues live here; the catalog enqueues these
by name (catalog.dispatch), so only worker processes import this module. It imports no torch itself: a worker
loads the network for its first task, or its warm-up below.
"""

from __future__ import annotations

import dataclasses

from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import worker_process_init
from django.conf import settings
from django.db import OperationalError, connection

from catalog import selectors
from catalog.dispatch import QUERY_ENCODE_TIMEOUT_S
from catalog.models import ImportChunk, ModelVersion
from catalog.services import embeddings, imports, maintenance, model_versions, products
from workers import pipelines

INDEXING_POLL_S = 2  # how often an indexing version checks whether every image has its embedding


@shared_task(name="workers.tasks.ping_database", acks_late=True)
def ping_database() -> dict:
    """Round trip through broker, worker and database: used by tests and readiness checks."""
    return {"model_versions": ModelVersion.objects.count()}


@shared_task(
    name="workers.tasks.embed_images",
    bind=True,
    acks_late=True,
    soft_time_limit=240,  # 64 images take about a second: a batch this slow is stuck, and the sweeper counts on it
    time_limit=300,
    autoretry_for=(OperationalError,),  # its only retry: EmbedDelivery tells it from a redelivery after a death
    retry_backoff=True,
    max_retries=5,
)
def embed_images(self: Task, image_ids: list[int]) -> dict:
    """Embed these images under every serving version (active, and one being indexed). Idempotent; an image whose
    embedding keeps killing the worker ends FAILED after EMBED_MAX_ATTEMPTS deliveries (catalog.services.embeddings)."""
    request = self.request
    delivery = embeddings.EmbedDelivery(task_id=request.id, retries=request.retries or 0) if request.id else None
    return pipelines.images_embed(image_ids=image_ids, delivery=delivery)


@shared_task(
    name="workers.tasks.encode_query",
    soft_time_limit=QUERY_ENCODE_TIMEOUT_S,  # the shopper waits this long (catalog.dispatch): fail fast, not hang
    time_limit=QUERY_ENCODE_TIMEOUT_S + 5,
    acks_late=False,  # a query nobody waits for any more is not worth running twice
)
def encode_query(image_b64: str, model_version_id: int, keypoints: bool = False, item_weight: float = 0.0) -> dict:
    """Encode a validated, re-encoded shopper photo with the given version (with `keypoints`, also extract its
    local features for geometric verification; with `item_weight`, mix in its best item box); returns plain JSON."""
    return pipelines.query_encode(
        photo_message=image_b64, version_id=model_version_id, keypoints=keypoints, item_weight=item_weight
    )


@shared_task(name="workers.tasks.train_baseline", acks_late=True, soft_time_limit=3000, time_limit=3600)
def train_baseline(model_version_id: int) -> dict:
    """Fit version 0 (pretrained backbone + PCA + ITQ) on the catalog, then start indexing with it."""
    version = pipelines.model_version_fit_baseline(version_id=model_version_id)
    return {"model_version": version.pk, "status": version.status}


@shared_task(name="workers.tasks.embed_finish_indexing", bind=True, max_retries=None, acks_late=True)
def embed_finish_indexing(self, model_version_id: int) -> dict:
    """Activate an indexing version once every image has its embedding; until then, look again shortly."""
    version = selectors.model_version_get(version_id=model_version_id)
    if version.status != ModelVersion.Status.INDEXING:
        return {"model_version": version.pk, "status": version.status}
    if not model_versions.model_version_finish_indexing(version=version):
        missing = selectors.images_missing_embedding(version=version).count()
        raise self.retry(countdown=INDEXING_POLL_S, exc=RuntimeError(f"{missing} images still to embed"))
    return {"model_version": version.pk, "status": version.status}


# A chunk takes about a second; minutes means a stuck image URL or disk (settings: IMPORT_CHUNK_*TIME_LIMIT_S).
IMPORT_CHUNK_SOFT_TIME_LIMIT_S = settings.IMPORT_CHUNK_SOFT_TIME_LIMIT_S
IMPORT_CHUNK_TIME_LIMIT_S = settings.IMPORT_CHUNK_TIME_LIMIT_S
# Database restarts and lock timeouts pass; more failures are real bugs. Within the chunk's attempt budget, which
# also counts deliveries that died (catalog.services.imports.IMPORT_CHUNK_MAX_ATTEMPTS).
IMPORT_CHUNK_MAX_RETRIES = imports.IMPORT_CHUNK_MAX_ATTEMPTS - 1


class _ImportChunkTask(Task):
    def on_failure(self, exc: Exception, task_id: str, args: tuple, kwargs: dict, einfo: object) -> None:
        """The hard time limit killed the process that ran the chunk: this runs in the worker's parent process
        (Celery acknowledges the message, so nothing would run the chunk again) and gives the chunk up with the
        reason, so the job finishes instead of staying "running". Other failures were recorded by the task."""
        if isinstance(exc, TimeLimitExceeded):
            chunk_id = int(kwargs.get("chunk_id", args[0] if args else 0))
            reason = f"the import of its chunk ran out of time (hard limit {IMPORT_CHUNK_TIME_LIMIT_S} s)"
            imports.import_chunk_fail(chunk_id=chunk_id, error=reason)


@shared_task(
    name="workers.tasks.import_run_chunk",
    base=_ImportChunkTask,
    bind=True,
    queue="embed",  # ingest feeds embedding: same workers, no extra queue to deploy
    acks_late=True,  # a worker lost mid-chunk leaves the message for the next one; the chunk is exactly-once
    max_retries=IMPORT_CHUNK_MAX_RETRIES,
    soft_time_limit=IMPORT_CHUNK_SOFT_TIME_LIMIT_S,
    time_limit=IMPORT_CHUNK_TIME_LIMIT_S,
)
def import_run_chunk(self, chunk_id: int) -> dict:
    """Import one chunk of a catalog upload (products upserted, images stored, embedding queued). Idempotent.

    Failures are retried with backoff; a chunk that still fails has its rows rejected with the reason, so the job
    finishes with honest counts instead of hanging in "running"."""
    try:
        return dataclasses.asdict(imports.import_run_chunk(chunk_id=chunk_id))
    except ImportChunk.DoesNotExist:
        return {"chunk_id": chunk_id, "missing": True}  # its job was deleted meanwhile
    except Exception as exc:
        if self.request.retries < IMPORT_CHUNK_MAX_RETRIES and not isinstance(exc, SoftTimeLimitExceeded):
            raise self.retry(exc=exc, countdown=5 * 3**self.request.retries) from exc  # 5, 15, 45 s
        _connection_reset()
        imports.import_chunk_fail(chunk_id=chunk_id, error=f"{type(exc).__name__}: {exc}")
        raise


def _connection_reset() -> None:
    """A new database connection for recording a failure: a soft time limit may have interrupted a statement
    mid-flight, and psycopg then refuses every further use of that connection ("connection in transaction status
    ACTIVE"), so the failure could never be written and the job would stay running. (Inside an atomic block, as when a
    test runs the task eagerly, the connection is the caller's to keep.)"""
    if not connection.in_atomic_block:
        connection.close()


IMPORT_ARCHIVE_CHECK_SOFT_TIME_LIMIT_S = 600  # inflating a 2 GB zip takes well under a minute


@shared_task(
    name="workers.tasks.import_check_archive",
    queue="embed",
    acks_late=True,  # idempotent: the check runs under the job's lock and is recorded on it
    soft_time_limit=IMPORT_ARCHIVE_CHECK_SOFT_TIME_LIMIT_S,
    time_limit=IMPORT_ARCHIVE_CHECK_SOFT_TIME_LIMIT_S + 60,
)
def import_check_archive(job_id: int) -> dict:
    """Inflate an import's zip under the caps, then queue its chunks; a zip that fails ends the job FAILED."""
    try:
        return {"job_id": job_id, "ok": imports.import_archive_check(job_id=job_id)}
    except SoftTimeLimitExceeded:
        limit = IMPORT_ARCHIVE_CHECK_SOFT_TIME_LIMIT_S
        _connection_reset()
        imports.import_job_fail(job_id=job_id, error=f"checking the zip of images took longer than {limit} s")
        raise


PRODUCT_IMAGE_FETCH_SOFT_TIME_LIMIT_S = int(settings.IMAGE_FETCH_DEADLINE_S) + 30  # the fetch's own deadline first


@shared_task(
    name="workers.tasks.product_image_fetch",
    queue="embed",
    acks_late=True,  # idempotent: a finished fetch is left alone, and the same file is stored once per product
    soft_time_limit=PRODUCT_IMAGE_FETCH_SOFT_TIME_LIMIT_S,
    time_limit=PRODUCT_IMAGE_FETCH_SOFT_TIME_LIMIT_S + 30,
)
def product_image_fetch(fetch_id: int) -> dict:
    """Fetch an image URL the merchant API was given and add it to its product (catalog.services.products)."""
    try:
        fetch = products.image_fetch_run(fetch_id=fetch_id)
    except SoftTimeLimitExceeded:
        _connection_reset()
        products.image_fetch_fail(fetch_id=fetch_id, error="fetching the image took too long")
        raise
    return {"fetch_id": fetch_id, "state": None if fetch is None else fetch.state}


@shared_task(name="workers.tasks.stuck_work_sweep", acks_late=True, time_limit=120)
def stuck_work_sweep() -> dict:
    """Periodic (beat): re-queue work a lost worker left stuck; see catalog.services.maintenance.stuck_work_sweep."""
    return maintenance.stuck_work_sweep()


@shared_task(name="workers.tasks.shopper_photos_expire", acks_late=True)
def shopper_photos_expire() -> dict:
    """Periodic (beat): delete shoppers' photos past their shop's retention; see catalog.services.maintenance."""
    return {"deleted": maintenance.shopper_photos_expire()}


@shared_task(name="workers.tasks.baseline_refit_check", acks_late=True)
def baseline_refit_check() -> dict:
    """Periodic (beat): fit a new version 0 once the catalog has outgrown the active one's fit; see
    catalog.services.model_versions.baseline_refit_if_due (an admin switches to it)."""
    version = model_versions.baseline_refit_if_due()
    return {"refit": version.pk if version else None}


@shared_task(name="workers.tasks.index_changes_prune", acks_late=True)
def index_changes_prune() -> dict:
    """Periodic (beat): keep the change log short; see catalog.services.maintenance.index_changes_prune."""
    return {"deleted": maintenance.index_changes_prune()}


@worker_process_init.connect
def _warm_up_worker_process(**_: object) -> None:
    pipelines.encoder_warm_up()


@shared_task(name="workers.tasks.warm_up_search", acks_late=False)
def warm_up_search() -> dict:
    """Load the active version's network in this (search) worker process: sent when a version becomes active."""
    return {"loaded": pipelines.encoder_warm_up()}


@shared_task(
    name="workers.tasks.train_network",
    acks_late=False,  # hours long: redelivery after the broker's visibility timeout would train it twice
    soft_time_limit=6 * 3600,
    time_limit=6 * 3600 + 60,
)
def train_network(training_run_id: int) -> dict:
    """Train FashionNet on the exported catalog for a TrainingRun started from the admin (None: cancelled)."""
    version = pipelines.training_run_execute(run_id=training_run_id)
    return {"training_run": training_run_id, "model_version": None if version is None else version.pk}


@shared_task(
    name="workers.tasks.evaluate_version",
    queue="train",  # embeds the catalog with the version and encodes the golden set: not on the shoppers' workers
    acks_late=True,  # idempotent: a re-run embeds nothing twice and overwrites the numbers with the same ones
    soft_time_limit=3600,
    time_limit=3600 + 60,
)
def evaluate_version(model_version_id: int) -> dict:
    """Evaluate a version on the golden set; the numbers land on the version (metrics["golden"])."""
    numbers = pipelines.version_evaluate_golden(version_id=model_version_id)
    return {"model_version": model_version_id, "r1": numbers.get("r1"), "queries": numbers.get("queries")}
