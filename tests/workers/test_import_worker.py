"""Imports on real workers: a worker process killed with SIGKILL mid-import and another started leaves exactly
the right rows; and an import embedded by version 0 end to end (re-upload embeds nothing, duplicates reported)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import transaction
from django.db.models import Count
from PIL import Image

from catalog.models import DuplicateFinding, ImageEmbedding, ImportChunk, ImportJob, ModelVersion, Product, ProductImage
from catalog.services import imports, model_versions
from shop_search.celery import app
from tests import factories
from tests.catalog.ingest_helpers import csv_bytes, picture, rejected, zip_bytes
from tests.waiting import wait_until
from tests.workers.celery_process import alive, worker_process


def _noisy_png(seed: int, size: int = 160) -> bytes:
    """Big enough that validating it takes a few ms: the import must still be running when the worker dies."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _worker(name: str):
    """A prefork worker process on the embed queue, with the kill-9 settings (a killed worker's unacknowledged
    task is handed out again within seconds)."""
    settings_module = {"DJANGO_SETTINGS_MODULE": "tests.workers.import_worker_settings"}
    return worker_process(queues="embed", name=name, env=settings_module)


def _kill(worker: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_import_and_another_started_leaves_exactly_the_right_rows():
    merchant = factories.merchant()
    good, broken = 240, 4
    rows = [{"sku": f"K-{i}", "title": f"Item {i}", "images": f"{i}.png"} for i in range(good)]
    rows += [{"sku": f"BROKEN-{i}", "title": "x", "images": f"broken{i}.png"} for i in range(broken)]
    rows += [{"sku": "MISSING", "title": "x", "images": "missing.png"}]  # rejected at upload
    files = {f"{i}.png": _noisy_png(i) for i in range(good)} | {f"broken{i}.png": b"junk" for i in range(broken)}
    app.control.purge()
    with transaction.atomic():
        job = imports.import_job_create(
            merchant=merchant, manifest=csv_bytes(rows), archive=io.BytesIO(zip_bytes(files)), chunk_rows=8
        )
    assert job.chunks_total == 31 and job.rejected == 1

    with _worker("import-first") as first:
        try:
            wait_until(
                lambda: alive(first) and ImportJob.objects.get(pk=job.pk).chunks_done >= 4,
                timeout=60,
                interval=0.02,
                message="no progress",
            )
        finally:
            _kill(first)
    job.refresh_from_db()
    assert job.state == ImportJob.State.RUNNING and 4 <= job.chunks_done < job.chunks_total, "killed too late"
    # Whatever was committed is consistent: counters match the rows, nothing half-written.
    assert Product.objects.count() == job.ok == ProductImage.objects.count()

    with _worker("import-second") as second:
        wait_until(lambda: alive(second) and ImportJob.objects.get(pk=job.pk).state == "done", timeout=180, interval=1)
    job.refresh_from_db()
    assert (job.total, job.processed, job.ok, job.rejected) == (good + broken + 1, good + broken + 1, good, broken + 1)
    assert job.chunks_done == job.chunks_total == ImportChunk.objects.filter(job=job, done=True).count()
    assert sorted(error["line"] for error in rejected(job)) == list(range(good + 2, good + broken + 3))
    assert Product.objects.count() == good and ProductImage.objects.count() == good
    assert set(Product.objects.values_list("sku", flat=True)) == {f"K-{i}" for i in range(good)}
    assert not ProductImage.objects.values("product").annotate(n=Count("id")).filter(n__gt=1).exists()


def _wait_active(version: ModelVersion, timeout_s: float = 120) -> ModelVersion:
    wait_until(
        lambda: ModelVersion.objects.get(pk=version.pk).status == "active", timeout=timeout_s, interval=0.2,
        message=lambda: ModelVersion.objects.get(pk=version.pk).metrics,
    )  # fmt: skip
    version.refresh_from_db()
    return version


def _import(merchant, manifest: bytes, archive: bytes) -> ImportJob:
    with transaction.atomic():
        job = imports.import_job_create(merchant=merchant, manifest=manifest, archive=io.BytesIO(archive))
    wait_until(lambda: ImportJob.objects.get(pk=job.pk).state == "done", timeout=60, interval=0.1)
    job.refresh_from_db()
    return job


def _embedded(count: int) -> bool:
    return (
        ImageEmbedding.objects.count() == count
        and not ProductImage.objects.filter(status=ProductImage.Status.PENDING).exists()
    )


@pytest.mark.django_db(transaction=True)
def test_import_is_embedded_once_by_version_zero_and_duplicates_are_reported(tmp_path, celery_worker_on):
    settings.MODELS_DIR = tmp_path
    shop, other = factories.merchant("shop"), factories.merchant("other")
    rows = [{"sku": f"P-{i}", "title": f"Product {i}", "category": "dress", "images": f"{i}.png"} for i in range(10)]
    rows.append({"sku": "P-TWIN", "title": "Same picture as P-3", "category": "dress", "images": "3.png"})
    files = {f"{i}.png": picture(100 + i, size=64) for i in range(10)}
    manifest, archive = csv_bytes(rows), zip_bytes(files)
    with celery_worker_on("embed", "train"):
        job = _import(shop, manifest, archive)
        assert (job.ok, job.images_new) == (11, 11)
        with transaction.atomic():
            version = model_versions.model_version_bootstrap(code_bits=32, fc7_dim=8)
        version = _wait_active(version)
        assert version.status == "active", version.metrics
        wait_until(lambda: _embedded(11), timeout=30, interval=0.02)

        # The same catalog again: same rows, no new image, no new embedding.
        before = list(ImageEmbedding.objects.order_by("id").values_list("id", "image_id", "created_at"))
        again = _import(shop, manifest, archive)
        assert (again.ok, again.images_new) == (11, 0)
        time.sleep(0.5)
        assert list(ImageEmbedding.objects.order_by("id").values_list("id", "image_id", "created_at")) == before

        # One changed image: exactly one new embedding, the old image and its embedding are gone.
        changed = dict(files, **{"5.png": picture(999, size=64)})
        third = _import(shop, manifest, zip_bytes(changed))
        assert third.images_new == 1
        wait_until(lambda: _embedded(11), timeout=30, interval=0.02)
        assert ImageEmbedding.objects.filter(product__sku="P-5").count() == 1

        # Another merchant uploads a copy of one of the shop's pictures.
        copy = _import(other, csv_bytes([{"sku": "C-1", "title": "Copied", "images": "c.png"}]),
                       zip_bytes({"c.png": files["7.png"]}))  # fmt: skip
        assert copy.ok == 1
        wait_until(lambda: _embedded(12), timeout=30, interval=0.02)

    twin = DuplicateFinding.objects.filter(kind="duplicate_listing", image__product__sku="P-TWIN").get()
    assert twin.other_image.product.sku == "P-3" and twin.merchant == shop
    copies = DuplicateFinding.objects.filter(kind="possible_copy")
    assert {(f.merchant.slug, f.image.product.sku) for f in copies} == {("shop", "P-7"), ("other", "C-1")}


@pytest.mark.django_db(transaction=True)
def test_import_catalog_command_watches_the_workers(tmp_path, celery_worker_on):
    manifest = csv_bytes([{"sku": f"W-{i}", "title": f"Item {i}", "images": f"{i}.png"} for i in range(5)])
    (tmp_path / "catalog.csv").write_bytes(manifest + b"W-BAD,,x,1,\n")
    (tmp_path / "images.zip").write_bytes(zip_bytes({f"{i}.png": picture(i) for i in range(5)}))
    out = io.StringIO()
    with celery_worker_on("embed"):
        call_command(
            "import_catalog", str(tmp_path / "catalog.csv"), images=str(tmp_path / "images.zip"), merchant="watched",
            create_merchant=True, chunk_rows=2, timeout=60, stdout=out, stderr=io.StringIO(),
        )  # fmt: skip
    assert "5 ok, 1 rejected of 6" in out.getvalue()
    assert Product.objects.filter(merchant__slug="watched").count() == 5
