"""Stuck states on real workers: an import chunk whose worker keeps dying (SIGKILL mid-chunk, as an out-of-memory
kill or the hard time limit does) ends with its rows rejected after IMPORT_CHUNK_MAX_ATTEMPTS deliveries, instead of
being handed to the next worker forever."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest
from django.db import transaction

from catalog.models import ImportChunk, ImportJob, Product
from catalog.services import imports
from shop_search.celery import app
from tests import factories
from tests.catalog.ingest_helpers import csv_bytes
from tests.waiting import wait_until
from tests.workers.celery_process import worker_process


class HangingImageHost:
    """An image host on loopback that accepts connections and never answers: the chunk's fetch hangs until the
    worker is killed."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections.append(connection)

    def close(self) -> None:
        self.server.close()
        for connection in self.connections:
            connection.close()


@pytest.mark.django_db(transaction=True)
def test_a_chunk_whose_worker_keeps_dying_ends_with_its_rows_rejected():
    host = HangingImageHost()
    merchant = factories.merchant()
    rows = [{"sku": f"H-{i}", "title": f"Item {i}", "images": f"http://127.0.0.1:{host.port}/{i}.jpg"} for i in (1, 2)]
    app.control.purge()
    with transaction.atomic():
        job = imports.import_job_create(merchant=merchant, manifest=csv_bytes(rows))
    chunk = ImportChunk.objects.get(job=job)
    # the kill-9 test's settings: a killed worker's unacknowledged task is handed out again within seconds
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.workers.import_worker_settings",
        "IMAGE_FETCH_ALLOWED_NETWORKS": "127.0.0.0/8",
    }
    try:
        for attempt in range(1, imports.IMPORT_CHUNK_MAX_ATTEMPTS + 1):
            with worker_process(queues="embed", name=f"dying-{attempt}", env=env) as worker:
                wait_until(
                    lambda a=attempt: ImportChunk.objects.get(pk=chunk.pk).attempts >= a, timeout=60,
                    message=f"delivery {attempt} never started",
                )  # fmt: skip
                assert worker.poll() is None, f"delivery {attempt} never started"
                time.sleep(0.3)  # the chunk is fetching from the host that never answers
                os.killpg(worker.pid, signal.SIGKILL)  # as the OOM killer or the hard time limit would
                worker.wait(timeout=30)
            assert not ImportChunk.objects.get(pk=chunk.pk).done
        with worker_process(queues="embed", name="after-the-deaths", env=env):
            wait_until(lambda: ImportJob.objects.get(pk=job.pk).state == ImportJob.State.DONE, timeout=60)
    finally:
        host.close()

    chunk.refresh_from_db()
    job.refresh_from_db()
    assert chunk.done and chunk.attempts == imports.IMPORT_CHUNK_MAX_ATTEMPTS and chunk.ok == 0
    assert (job.processed, job.ok, job.rejected) == (2, 0, 2)
    assert [error["sku"] for error in chunk.errors] == ["H-1", "H-2"]
    assert all(
        f"started {imports.IMPORT_CHUNK_MAX_ATTEMPTS} times and never finished" in e["error"] for e in chunk.errors
    )
    assert not Product.objects.filter(merchant=merchant).exists()


def _embed_queue() -> int:
    from catalog import dispatch

    return dispatch.queue_length("embed")


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_requeues_a_stuck_import_and_lost_embeds_and_a_worker_finishes_them(celery_worker_on):
    from django.utils import timezone

    from catalog.models import ImageFetch, ProductImage
    from catalog.services import maintenance
    from tests.catalog.ingest_helpers import catalog

    app.control.purge()
    _purge_embed()
    merchant = factories.merchant()
    manifest, archive = catalog(5)
    # Two jobs whose chunk messages were lost (never sent here; a killed worker's stay unacked for an hour).
    stuck = imports.import_job_create(merchant=merchant, manifest=manifest, archive=_file(archive), enqueue=False)
    fresh = imports.import_job_create(
        merchant=factories.merchant("fresh"), manifest=manifest, archive=_file(archive), enqueue=False
    )
    long_ago = timezone.now() - timezone.timedelta(seconds=maintenance.STUCK_AFTER_S + 60)
    ImportJob.objects.filter(pk=stuck.pk).update(created_at=long_ago)
    lost = factories.image(factories.product(merchant, sku="LOST"), "lost.png")
    ProductImage.objects.filter(pk=lost.pk).update(created_at=long_ago)  # pending, its embed batch lost
    # An image by URL whose task was lost (its host is private, so the worker ends it failed with the reason).
    fetch = ImageFetch.objects.create(product=lost.product, url="http://10.1.2.3/shoe.jpg")
    ImageFetch.objects.filter(pk=fetch.pk).update(created_at=long_ago)
    assert _embed_queue() == 0

    swept = maintenance.stuck_work_sweep()

    # the fresh job is left alone
    assert swept == {"chunks": stuck.chunks_total, "images": 1, "image_fetches": 1, "finishing": 0, "given_up": 0,
                     "backlog": 0}  # fmt: skip
    assert _embed_queue() == stuck.chunks_total + 2
    assert maintenance.stuck_work_sweep()["backlog"] == 1 and _embed_queue() == stuck.chunks_total + 2  # no doubles
    with celery_worker_on("embed", purge=False):  # the swept work waits for it
        wait_until(lambda: ImportJob.objects.get(pk=stuck.pk).state == ImportJob.State.DONE, timeout=60)
        wait_until(lambda: _embed_queue() == 0, timeout=30, message=_embed_queue)
        wait_until(lambda: ImageFetch.objects.get(pk=fetch.pk).state == ImageFetch.State.FAILED, timeout=30)
    assert "non-public" in ImageFetch.objects.get(pk=fetch.pk).error
    assert ImportJob.objects.get(pk=stuck.pk).ok == 5
    assert ImportJob.objects.get(pk=fresh.pk).state == ImportJob.State.PENDING


def _purge_embed() -> None:
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge("embed")


def _file(data: bytes):
    import io

    return io.BytesIO(data)


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_finishes_an_indexing_version_whose_finishing_poll_was_lost(celery_worker_on):
    from catalog.models import ModelVersion
    from catalog.services import maintenance

    app.control.purge()
    _purge_embed()
    old = ModelVersion.objects.create(name="old", checkpoint="o.pt", status="active", code_bits=8, fc7_dim=4)
    new = ModelVersion.objects.create(name="new", checkpoint="n.pt", status="indexing", code_bits=8, fc7_dim=4)
    # every image is embedded (there are none), but the poll that would activate it died with its worker

    assert maintenance.stuck_work_sweep() == {
        "chunks": 0,
        "images": 0,
        "image_fetches": 0,
        "finishing": 1,
        "given_up": 0,
        "backlog": 0,
    }
    with celery_worker_on("embed", purge=False):
        wait_until(lambda: ModelVersion.objects.get(pk=new.pk).status == "active", timeout=30)
    assert ModelVersion.objects.get(pk=old.pk).status == "retired"
    assert maintenance.stuck_work_sweep()["finishing"] == 0  # nothing indexing any more
