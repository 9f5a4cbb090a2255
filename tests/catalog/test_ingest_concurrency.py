"""Two imports of the same catalog at the same moment (a merchant double-clicking "upload"): both finish, every
row counted once per job, and the catalog holds each product and image exactly once. (The slower job's insert
waits for the other's commit and leaves its rows alone; it then locks them and finds nothing to change.)"""

import io
import threading

import pytest
from django.db import connection

from catalog.models import ImportJob, Product, ProductImage
from catalog.services import imports
from tests import factories
from tests.catalog.ingest_helpers import catalog


@pytest.mark.django_db(transaction=True)
def test_concurrent_imports_of_the_same_catalog_write_each_row_once():
    merchant = factories.merchant()
    manifest, archive = catalog(30)
    jobs = [
        imports.import_job_create(merchant=merchant, manifest=manifest, archive=io.BytesIO(archive), enqueue=False)
        for _ in range(2)
    ]
    barrier = threading.Barrier(2)
    failures: list[BaseException] = []

    def run(job: ImportJob) -> None:
        try:
            barrier.wait(timeout=10)
            for chunk_id in job.chunks.values_list("id", flat=True):
                imports.import_run_chunk(chunk_id=chunk_id)
        except BaseException as exc:  # reported below: a thread's exception would otherwise vanish
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    for job in jobs:
        job.refresh_from_db()
        assert (job.state, job.processed, job.ok, job.rejected) == ("done", 30, 30, 0)
    assert Product.objects.count() == 30 and ProductImage.objects.count() == 30
    assert sum(job.images_new for job in jobs) == 30  # each image stored (and queued for embedding) once
