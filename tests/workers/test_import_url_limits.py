"""Import chunks with image URLs on a real prefork worker (as deployed), against a real HTTP server that never
finishes answering: on the soft time limit the chunk stops waiting (fetches not started are cancelled, running ones
are not waited for) and its rows are rejected with the reason; on the hard time limit (the pool process killed) the
worker's parent still fails the chunk; either way the job ends DONE, never "running" forever."""

from __future__ import annotations

import time

import pytest

from catalog import dispatch
from catalog.models import ImportChunk, ImportJob, Product
from catalog.services import imports
from shop_search.celery import app
from tests import factories
from tests.catalog.hanging_http import hanging_server
from tests.catalog.ingest_helpers import csv_bytes, rejected
from tests.catalog.other_transaction import OtherTransaction
from tests.waiting import wait_until
from tests.workers.celery_process import alive, worker_process

LOCAL_IMAGE_HOSTS = {"IMAGE_FETCH_ALLOWED_NETWORKS": "127.0.0.1/32"}
# A queue of these tests' own: a worker another test left on `embed` (without these limits) cannot take the chunk.
QUEUE = "import-limits-test"


def _run_chunk(job: ImportJob) -> None:
    """Queue the job's chunk for the worker. The limits are the worker's (its environment): without the explicit
    None, a test process that has imported workers.tasks would put its own (5 minutes) in the message."""
    chunk_id = job.chunks.get().pk
    app.send_task(dispatch.RUN_IMPORT_CHUNK.name, args=[chunk_id], queue=QUEUE, time_limit=None, soft_time_limit=None)


def _finished(job: ImportJob, worker) -> ImportJob | None:
    alive(worker)
    job.refresh_from_db()
    return job if job.state == ImportJob.State.DONE else None


@pytest.mark.django_db(transaction=True)
def test_on_the_soft_time_limit_pending_fetches_are_cancelled_and_the_rows_rejected():
    """16 hanging URLs, 8 fetched at a time, each with a 20 s deadline: waiting for them would take 40 s; the 3 s
    soft limit ends the chunk at once."""
    env = {**LOCAL_IMAGE_HOSTS, "IMPORT_CHUNK_SOFT_TIME_LIMIT_S": "3", "IMAGE_FETCH_DEADLINE_S": "20"}
    app.control.purge()
    with hanging_server() as base, worker_process(queues=QUEUE, name="soft-limit", env=env) as worker:
        rows = [{"sku": f"H{i}", "title": "hangs", "images": f"{base}/trickle-headers?{i}"} for i in range(16)]
        app.send_task("workers.tasks.ping_database", queue=QUEUE).get(timeout=60)  # the worker is up
        started = time.monotonic()
        job = imports.import_job_create(merchant=factories.merchant(), manifest=csv_bytes(rows), enqueue=False)
        assert job.chunks_total == 1
        _run_chunk(job)
        job = wait_until(lambda: _finished(job, worker), timeout=60, message="the job stayed running")
        elapsed = time.monotonic() - started
    print(f"\nchunk of 16 hanging URLs given up after {elapsed:.1f} s (soft limit 3 s)")
    assert elapsed < 15  # 3 s limit, one retry-free failure; waiting for the fetches would be 40 s
    assert (job.ok, job.rejected) == (0, 16) and Product.objects.count() == 0
    assert all("SoftTimeLimitExceeded" in row["error"] for row in rejected(job))


@pytest.mark.django_db(transaction=True)
def test_on_the_hard_time_limit_the_parent_process_fails_the_chunk():
    """A chunk stuck past both limits (here: waiting on a row lock another transaction holds, as a stuck database
    would): the hard limit (2 s) ends the task, Celery acknowledges its message (nothing would run it again), and the
    job still finishes with the row rejected: whichever records it first, the pool process's soft-limit path (once
    the lock is free) or the parent's `on_failure` (test below), the other finds the chunk done."""
    env = {"IMPORT_CHUNK_SOFT_TIME_LIMIT_S": "1", "IMPORT_CHUNK_TIME_LIMIT_S": "2"}
    app.control.purge()
    rows = [{"sku": "STUCK", "title": "waits for a lock", "images": ""}]
    job = imports.import_job_create(merchant=factories.merchant(), manifest=csv_bytes(rows), enqueue=False)
    chunk = job.chunks.get()
    with worker_process(queues=QUEUE, name="hard-limit", env=env) as worker:
        app.send_task("workers.tasks.ping_database", queue=QUEUE).get(timeout=60)  # the worker is up
        with OtherTransaction(lambda: ImportChunk.objects.select_for_update().get(pk=chunk.pk)):
            _run_chunk(job)
            time.sleep(10)  # the lock is held well past the hard limit
        job = wait_until(lambda: _finished(job, worker), timeout=60, message="the job stayed running")
    assert (job.ok, job.rejected) == (0, 1)
    assert "hard limit 2 s" in rejected(job)[0]["error"] or "SoftTimeLimitExceeded" in rejected(job)[0]["error"]


@pytest.mark.django_db(transaction=True)
def test_the_hard_limit_handler_fails_the_chunk_with_the_reason():
    """What the worker's parent process runs when the hard limit killed a chunk's process (Celery 5.7 calls the
    task's on_failure there): the chunk's rows are rejected with the reason and the job ends."""
    from billiard.exceptions import TimeLimitExceeded

    from workers import tasks

    rows = [{"sku": "KILLED", "title": "killed mid-chunk", "images": ""}]
    job = imports.import_job_create(merchant=factories.merchant(), manifest=csv_bytes(rows), enqueue=False)
    chunk = job.chunks.get()
    tasks.import_run_chunk.on_failure(TimeLimitExceeded(2), "task-id", (chunk.pk,), {}, None)
    job.refresh_from_db()
    assert job.state == ImportJob.State.DONE and (job.ok, job.rejected) == (0, 1)
    assert f"ran out of time (hard limit {tasks.IMPORT_CHUNK_TIME_LIMIT_S} s)" in rejected(job)[0]["error"]
    tasks.import_run_chunk.on_failure(ValueError("other"), "task-id", (chunk.pk,), {}, None)  # no-op: done
