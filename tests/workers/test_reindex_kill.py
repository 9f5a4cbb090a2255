"""kill -9 mid-reindex on real worker processes: a switch to a new version is indexing the catalog when its worker
(prefork pool, as deployed) is SIGKILLed; a new worker and the stuck-work sweeper (its real task, sent as beat
would) finish the indexing with exact rows: one embedding per image per version, none missing, none doubled, the
new version active, the old one retired, nothing pending and nothing left in the queue.

The workers run with the production broker settings (visibility timeout: an hour), so the batch the killed
worker held, and its finishing poll, do not come back by themselves within the test: the sweeper must recover
them. Beat sends the sweep every minute; the test sends it itself once the queue has drained.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from django.core.files.base import ContentFile
from django.db import transaction
from django.db.models import Count
from django.utils import timezone
from PIL import Image

from catalog import dispatch
from catalog.models import ImageEmbedding, ModelVersion, ProductImage
from catalog.services import model_versions
from shop_search.celery import app
from tests import factories
from tests.waiting import wait_until
from tests.workers.celery_process import alive, worker_process

IMAGES = 160
BATCH = 8  # images per embed task here (production: dispatch.EMBED_CHUNK): the indexing takes 20 tasks


def _photo(seed: int) -> bytes:
    """A noisy 96 px product shot, distinct per seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    pixels[20:76, 20:76] = rng.integers(0, 256, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _version(name: str, path, status: str, seed: int) -> ModelVersion:
    from workers.ml.baseline import fit_baseline

    sample = [Image.open(io.BytesIO(_photo(1000 + seed + i))).convert("RGB") for i in range(8)]
    checkpoint = fit_baseline(sample, out_path=path / f"{name}.pt", code_bits=32, fc7_dim=4, input_size=64, seed=seed)
    return ModelVersion.objects.create(name=name, checkpoint=str(checkpoint), status=status, code_bits=32, fc7_dim=4)


def _embedded(version: ModelVersion) -> int:
    return ImageEmbedding.objects.filter(model_version=version).count()


def _kill(worker) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)  # the whole group: the pool child mid-batch and its parent
    worker.wait(timeout=30)


def _sweep() -> dict:
    """The beat's periodic sweep, through the real task on a worker. (It skips a run that finds a message in the
    queue, such as the finishing poll's next try passing through: then it is sent again, as beat would.)"""
    for _ in range(10):
        swept = app.send_task("workers.tasks.stuck_work_sweep", queue="embed").get(timeout=120)
        if not swept["backlog"]:
            return swept
    raise AssertionError("the embed queue never drained")


def _active_or_sweep(version: ModelVersion) -> bool:
    if ModelVersion.objects.get(pk=version.pk).status == ModelVersion.Status.ACTIVE:
        return True
    _sweep()
    return False


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_reindex_leaves_exact_rows_once_a_new_worker_and_the_sweeper_finish(
    settings, tmp_path, monkeypatch
):
    settings.MODELS_DIR = tmp_path
    merchant = factories.merchant()
    for i in range(IMAGES):
        row = ProductImage(product=factories.product(merchant, sku=f"R-{i}"), sha256=f"{i:064d}")
        row.file.save(f"r{i}.png", ContentFile(_photo(i)), save=True)
    old = _version("v-old", tmp_path, ModelVersion.Status.ACTIVE, seed=1)
    new = _version("v-new", tmp_path, ModelVersion.Status.READY, seed=2)
    model_versions.code_index_ensure(version=old)
    monkeypatch.setattr(dispatch, "EMBED_CHUNK", BATCH)
    app.control.purge()
    with worker_process(queues="embed", name="index-old") as worker:  # the catalog as search has it before the switch
        with transaction.atomic():
            dispatch.embed_images(image_ids=list(ProductImage.objects.values_list("id", flat=True)))
        wait_until(lambda: alive(worker) and _embedded(old) == IMAGES, timeout=240, message=lambda: _embedded(old))
    # The catalog is older than the sweeper's STUCK_AFTER_S, as a shop's catalog is when an admin switches versions.
    ProductImage.objects.update(created_at=timezone.now() - timezone.timedelta(days=1))
    assert set(ProductImage.objects.values_list("status", flat=True)) == {"embedded"}

    # One image of the fourth batch becomes a FIFO nobody writes to: the worker that opens it hangs there, inside
    # that batch (as on a stalled disk), so the kill below lands mid-batch every time, not between two batches.
    hanging = ProductImage.objects.order_by("product_id", "position", "id")[3 * BATCH]
    stored = Path(hanging.file.path)
    content = stored.read_bytes()
    stored.unlink()
    os.mkfifo(stored)
    with worker_process(queues="embed", name="reindex-first") as first:
        with transaction.atomic():
            model_versions.model_version_switch(version=new, override=True)
        try:
            wait_until(lambda: alive(first) and _embedded(new) >= 3 * BATCH, timeout=240, interval=0.05)
            time.sleep(1)  # it has taken the fourth batch and hangs in it
        finally:
            _kill(first)
    stored.unlink()
    stored.write_bytes(content)  # the disk is back
    at_kill = _embedded(new)
    new.refresh_from_db()
    assert new.status == ModelVersion.Status.INDEXING and at_kill == 3 * BATCH

    with worker_process(queues="embed", name="reindex-second") as second:
        # the batches still queued are taken by the new worker; what the dead one held is not (an hour away)
        wait_until(
            lambda: alive(second) and dispatch.queue_length("embed") == 0, timeout=240,
            message=lambda: f"{dispatch.queue_length('embed')} queued, {_embedded(new)} embedded",
        )  # fmt: skip
        swept = _sweep()
        assert swept["images"] == BATCH, swept  # the batch the dead worker held, and only it, re-queued
        wait_until(lambda: alive(second) and _embedded(new) == IMAGES, timeout=240, message=lambda: _embedded(new))
        # every image is in; the finishing poll the dead worker held is gone too: the next sweep finishes the switch
        wait_until(
            lambda: alive(second) and _active_or_sweep(new), timeout=120, interval=1,
            message=lambda: ModelVersion.objects.get(pk=new.pk).status,
        )  # fmt: skip
        assert _sweep() == {
            "chunks": 0,
            "images": 0,
            "image_fetches": 0,
            "finishing": 0,
            "given_up": 0,
            "backlog": 0,
        }  # nothing left stuck

    new.refresh_from_db()
    old.refresh_from_db()
    assert (new.status, old.status) == (ModelVersion.Status.ACTIVE, ModelVersion.Status.RETIRED)
    per_image = ImageEmbedding.objects.values("image_id", "model_version_id").annotate(n=Count("id"))
    assert {row["n"] for row in per_image} == {1}  # none doubled
    assert _embedded(new) == _embedded(old) == IMAGES  # none missing, under either version
    assert set(ProductImage.objects.values_list("status", flat=True)) == {"embedded"}  # nothing pending or failed
