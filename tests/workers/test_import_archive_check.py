"""An import's zip is inflated in a task, not in the upload request (catalog.services.imports.import_archive_check):
a zip whose headers pass but whose real bytes do not ends its job FAILED with the reason, on a real worker, and
leaves nothing behind (no product, no image, no upload file); a good zip is checked once and then imported."""

from __future__ import annotations

import io
import os
import zipfile

import pytest
from django.urls import reverse

from catalog.models import ImportChunk, ImportJob, Product, ProductImage
from shop_search.celery import app
from tests import factories
from tests.catalog.ingest_helpers import csv_bytes, picture, zip_bytes
from tests.catalog.test_zip import _lie_about_sizes
from tests.waiting import wait_until


def _upload(client, manifest: bytes, archive: bytes) -> ImportJob:
    app.control.purge()  # nothing another test left behind
    response = client.post(
        reverse("api:merchant-import-list"),
        {"manifest": io.BytesIO(manifest), "images": io.BytesIO(archive)},
        format="multipart",
    )
    assert response.status_code == 202, response.content
    return ImportJob.objects.get(pk=response.json()["id"])


def _finished(job: ImportJob) -> ImportJob | None:
    job.refresh_from_db()
    return job if job.state in (ImportJob.State.DONE, ImportJob.State.FAILED) else None


@pytest.mark.django_db(transaction=True)
def test_a_zip_that_lies_in_its_headers_fails_its_job_in_the_worker_and_leaves_nothing(
    merchant_client, celery_worker_on
):
    client = merchant_client(merchant=factories.merchant())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ok.png", picture(1))
        archive.writestr("bomb.png", b"\0" * (3 * 1024 * 1024))  # declared below as 1,000 bytes
    lying = _lie_about_sizes(buffer.getvalue(), b"bomb.png", 1000)
    manifest = csv_bytes(
        [{"sku": "A", "title": "a", "images": "ok.png"}, {"sku": "B", "title": "b", "images": "bomb.png"}]
    )
    job = _upload(client, manifest, lying)  # the request read only the central directory
    assert job.state == ImportJob.State.PENDING and job.archive and not job.archive_checked
    archive_path = job.archive.path
    with celery_worker_on("embed", purge=False):  # the upload queued the check
        job = wait_until(lambda: _finished(job), timeout=60, message="the job never finished")
    assert job.state == ImportJob.State.FAILED
    assert job.error.startswith("the zip of images was refused: zip entry 'bomb.png'"), job.error
    assert Product.objects.count() == ProductImage.objects.count() == 0
    assert not ImportChunk.objects.filter(job=job, done=True).exists()
    assert not job.archive
    wait_until(lambda: not os.path.exists(archive_path), timeout=10, message="the upload stayed")
    detail = client.get(reverse("api:merchant-import-detail", args=[job.pk])).json()
    assert detail["state"] == "failed" and "refused" in detail["error"]


@pytest.mark.django_db(transaction=True)
def test_a_good_zip_is_checked_in_the_worker_then_imported(merchant_client, celery_worker_on):
    client = merchant_client(merchant=factories.merchant())
    rows = [{"sku": f"S-{i}", "title": f"t{i}", "images": f"{i}.png"} for i in range(5)]
    job = _upload(client, csv_bytes(rows), zip_bytes({f"{i}.png": picture(i) for i in range(5)}))
    with celery_worker_on("embed", purge=False):  # the upload queued the check
        job = wait_until(lambda: _finished(job), timeout=60, message="the job never finished")
    assert job.state == ImportJob.State.DONE and job.archive_checked and job.error == ""
    assert job.ok == 5 and Product.objects.count() == 5
