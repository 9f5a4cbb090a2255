"""An image whose embedding kills the worker, on a real prefork worker: the pool child is SIGKILLed (as the
out-of-memory killer would) each time it works on that image. The broker hands the batch back at once
(acks_late + reject_on_worker_lost), and without a cap it would do so forever while the indexing waited. Here the
image ends FAILED, with the reason, after EMBED_MAX_ATTEMPTS deaths; every other image of the catalog is embedded,
and the indexing the catalog was going through finishes without it.

The poison image is a FIFO nobody writes to: a process that opens it blocks there, deterministically, until the
test kills it. The test knows the child is blocked on it (and not elsewhere) because opening the FIFO's write end
without blocking succeeds only while a reader holds it; it keeps that end open (so the reader stays blocked, now in
read(), instead of reading an empty file) until the child is dead. Every wait has a deadline, and the loop is
bounded, so the test cannot hang: a worker that never reaches the FIFO, or keeps reaching it past the cap, fails it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings as django_settings
from django.core.files.base import ContentFile
from django.db import transaction
from PIL import Image

from catalog.models import ImageEmbedding, ModelVersion, ProductImage
from catalog.services import model_versions
from shop_search.celery import app
from tests import factories
from tests.waiting import wait_until
from tests.workers.celery_process import alive, worker_process

GOOD_IMAGES = 8


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    pixels[20:76, 20:76] = rng.integers(0, 256, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _version(path: Path) -> ModelVersion:
    from workers.ml.baseline import fit_baseline

    sample = [Image.open(io.BytesIO(_photo(1000 + i))).convert("RGB") for i in range(8)]
    checkpoint = fit_baseline(sample, out_path=path / "v.pt", code_bits=32, fc7_dim=4, input_size=64, seed=1)
    return ModelVersion.objects.create(
        name="v", checkpoint=str(checkpoint), status=ModelVersion.Status.READY, code_bits=32, fc7_dim=4
    )


def _children(pid: int) -> list[int]:
    """The worker's pool children (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                # the command may hold spaces and parentheses: the fields after the last ')' are fixed
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def _reader_held(fifo: Path) -> int | None:
    """The FIFO's write end if a process has it open for reading (blocked there), else None."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader
            return None
        raise


def _status(image: ProductImage) -> str:
    """Read without building the model (nothing in this process may open the FIFO)."""
    return ProductImage.objects.filter(pk=image.pk).values_list("status", flat=True).get()


def _statuses() -> list[tuple[int, str, int]]:
    return list(ProductImage.objects.values_list("pk", "status", "embed_attempts"))


@pytest.mark.django_db(transaction=True)
def test_an_image_that_kills_its_worker_ends_failed_after_the_cap_and_the_rest_is_embedded_and_indexed(
    settings, tmp_path
):
    settings.MODELS_DIR = tmp_path
    cap = django_settings.EMBED_MAX_ATTEMPTS  # as deployed (3 unless EMBED_MAX_ATTEMPTS says otherwise)
    merchant = factories.merchant()
    # The poison first: it has the lowest id, so the first delivery reaches it before any other image is read.
    poison = ProductImage(product=factories.product(merchant, sku="POISON"), sha256="f" * 64)
    poison.file.save("poison.png", ContentFile(_photo(99)), save=True)
    good = []
    for i in range(GOOD_IMAGES):
        row = ProductImage(product=factories.product(merchant, sku=f"G-{i}"), sha256=f"{i:064d}")
        row.file.save(f"g{i}.png", ContentFile(_photo(i)), save=True)
        good.append(row)
    # Width and height stored, as image_store stores them: otherwise merely loading a row opens its file (the
    # ImageField fills missing dimensions from it), and the poison's would block whoever loads it, this test too.
    ProductImage.objects.update(width=96, height=96)
    fifo = Path(poison.file.path)
    fifo.unlink()
    os.mkfifo(fifo)
    version = _version(tmp_path)
    app.control.purge()

    kills = 0
    try:
        with worker_process(queues="embed", name="poisoned") as worker:
            with transaction.atomic():  # the catalog's indexing: one batch of all the images, and its finishing poll
                model_versions.model_version_switch(version=version)
            # Each round: the child blocks on the poison, and is killed; the broker hands the batch to a new child.
            # Bounded: the cap's worth of kills, and one more round must find the image failed, not blocked.
            for _ in range(cap + 1):
                writer = wait_until(
                    lambda: alive(worker) and (_status(poison) == "failed" or _reader_held(fifo)),
                    timeout=120, interval=0.05,
                    message=lambda k=kills: f"after {k} kills: {_statuses()}",
                )  # fmt: skip
                if writer is True:  # failed: no child is reading it any more
                    break
                try:
                    children = _children(worker.pid)
                    assert len(children) == 1, children  # --concurrency 1: the child blocked on the FIFO
                    os.kill(children[0], signal.SIGKILL)
                    kills += 1
                    wait_until(lambda c=children[0]: not Path(f"/proc/{c}").exists(), timeout=30)
                finally:
                    os.close(writer)
            wait_until(
                lambda: alive(worker) and ModelVersion.objects.get(pk=version.pk).status == ModelVersion.Status.ACTIVE,
                timeout=120, message=_statuses,
            )  # fmt: skip
    finally:
        fifo.unlink(missing_ok=True)

    assert kills == cap  # killed on it exactly the cap's worth of times, never again after
    poison = ProductImage.objects.get(pk=poison.pk)  # (refresh_from_db would open the file, gone now)
    assert poison.status == ProductImage.Status.FAILED and poison.embed_attempts == cap
    assert f"the worker processing it died {cap} times" in poison.error
    assert {image.status for image in ProductImage.objects.filter(pk__in=[g.pk for g in good])} == {"embedded"}
    embedded = set(ImageEmbedding.objects.filter(model_version=version).values_list("image_id", flat=True))
    assert embedded == {g.pk for g in good}  # every other image, under the version that is now active
    assert set(ProductImage.objects.filter(pk__in=embedded).values_list("embed_attempts", flat=True)) == {0}
