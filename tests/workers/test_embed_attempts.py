"""The embed attempt cap on the real database, the real embed pipeline and a real (small) version 0 network.

A process death cannot happen inside the test process, so here it is stood in for by an exception no code catches
(BaseException, as the kill leaves everything after it undone): what matters is what was committed before it. The
real kill of a real prefork child is tests/workers/test_embed_attempt_cap.py."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings as django_settings
from django.core.files.base import ContentFile
from django.db import OperationalError
from django.utils import timezone
from PIL import Image

from catalog import selectors
from catalog.models import ImageEmbedding, ModelVersion, ProductImage
from catalog.services import embeddings, maintenance, model_versions
from shop_search.celery import app
from tests import factories
from workers import pipelines, tasks

pytestmark = pytest.mark.django_db


class ProcessDied(BaseException):
    """Stands in for the kernel killing the worker: nothing in the pipeline catches it."""


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    pixels[20:76, 20:76] = rng.integers(0, 256, 3, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real version 0 network (tiny), fitted once for the module (its encoder is then loaded once too)."""
    from workers.ml.baseline import fit_baseline

    folder = tmp_path_factory.mktemp("models")
    sample = [Image.open(io.BytesIO(_photo(1000 + i))).convert("RGB") for i in range(8)]
    return fit_baseline(sample, out_path=folder / "v.pt", code_bits=32, fc7_dim=4, input_size=64, seed=1)


@pytest.fixture
def version(settings, checkpoint) -> ModelVersion:
    """That network as a version being indexed: the catalog's images are embedded with it."""
    settings.MODELS_DIR = checkpoint.parent
    version = ModelVersion.objects.create(
        name="v", checkpoint=str(checkpoint), status=ModelVersion.Status.INDEXING, code_bits=32, fc7_dim=4
    )
    model_versions.code_index_ensure(version=version)
    return version


def _purge_embed() -> None:
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge("embed")


def _catalog(n: int) -> list[ProductImage]:
    merchant = factories.merchant()
    images = []
    for i in range(n):
        row = ProductImage(product=factories.product(merchant, sku=f"S-{i}"), sha256=f"{i:064d}")
        row.file.save(f"s{i}.png", ContentFile(_photo(i)), save=True)
        images.append(row)
    return images


def _dies_on(monkeypatch, poison: ProductImage, seen: list[int] | None = None) -> None:
    """Opening `poison` kills the process (as a huge file's decode does, out of memory); `seen` logs every open."""
    real_open = selectors.image_open

    def image_open(*, image: ProductImage, **kwargs):
        if seen is not None:
            seen.append(image.pk)
        if image.pk == poison.pk:
            raise ProcessDied
        return real_open(image=image, **kwargs)

    monkeypatch.setattr(selectors, "image_open", image_open)


def _attempts(images: list[ProductImage]) -> list[int]:
    by_pk = dict(ProductImage.objects.filter(pk__in=[i.pk for i in images]).values_list("pk", "embed_attempts"))
    return [by_pk[image.pk] for image in images]


def test_a_batch_counts_its_images_before_reading_them_and_success_clears_the_count(version, monkeypatch):
    poison, *good = _catalog(4)
    _dies_on(monkeypatch, poison)
    delivery = embeddings.EmbedDelivery(task_id="t-1")

    with pytest.raises(ProcessDied):
        pipelines.images_embed(image_ids=[image.pk for image in [poison, *good]], delivery=delivery)

    # counted and committed before any file was read: the death is on every image the batch had begun
    assert _attempts([poison, *good]) == [1, 1, 1, 1]
    assert set(ProductImage.objects.values_list("embed_attempt_by", flat=True)) == {"t-1:0"}
    assert not ImageEmbedding.objects.exists()
    monkeypatch.undo()
    result = pipelines.images_embed(image_ids=[image.pk for image in good], delivery=delivery)
    assert result["embedded"] == 3
    assert _attempts(good) == [0, 0, 0]  # embedded: the count starts again


@pytest.mark.django_db(transaction=True)  # the activation builds an index: not inside the test's transaction
def test_redeliveries_fail_the_image_that_kills_them_at_the_cap_and_embed_the_rest_one_at_a_time(version, monkeypatch):
    cap = django_settings.EMBED_MAX_ATTEMPTS
    poison, *good = _catalog(6)  # the poison has the lowest id: the first delivery reaches it first
    ids = [image.pk for image in [poison, *good]]
    seen: list[int] = []
    _dies_on(monkeypatch, poison, seen)
    delivery = embeddings.EmbedDelivery(task_id="t-2")  # the broker redelivers the same message after each death

    deaths = 0
    for _ in range(cap + 2):
        seen.clear()
        try:
            result = pipelines.images_embed(image_ids=ids, delivery=delivery)
            break
        except ProcessDied:
            deaths += 1
    else:
        raise AssertionError("the batch never finished")

    assert deaths == cap
    assert seen == []  # the last delivery did not even open the poison
    assert result["failed"] == 1 and result["embedded"] == 0  # the good images were saved by an earlier delivery
    poison.refresh_from_db()
    assert poison.status == ProductImage.Status.FAILED and poison.embed_attempts == cap
    assert poison.error == embeddings.embed_give_up_reason(cap)
    assert f"died {cap} times" in poison.error
    assert set(ProductImage.objects.filter(pk__in=ids[1:]).values_list("status", "embed_attempts")) == {("embedded", 0)}
    assert set(ImageEmbedding.objects.values_list("image_id", flat=True)) == set(ids[1:])
    # the indexing no longer waits for the failed image: it finishes, and the version is active
    assert not selectors.images_missing_embedding(version=version).exists()
    assert model_versions.model_version_finish_indexing(version=version)
    version.refresh_from_db()
    assert version.status == ModelVersion.Status.ACTIVE


def test_after_a_death_the_suspect_goes_last_and_only_it_is_charged(version, monkeypatch):
    poison, *good = _catalog(4)
    ids = [image.pk for image in [poison, *good]]
    seen: list[int] = []
    _dies_on(monkeypatch, poison, seen)
    delivery = embeddings.EmbedDelivery(task_id="t-3")
    with pytest.raises(ProcessDied):  # first delivery: one batch, all counted, dies on the poison
        pipelines.images_embed(image_ids=ids, delivery=delivery)
    with pytest.raises(ProcessDied):  # one at a time now; a tie on deaths: by id, the poison first, dies again
        pipelines.images_embed(image_ids=ids, delivery=delivery)
    assert _attempts([poison, *good]) == [2, 1, 1, 1]  # only the image being worked on was charged
    seen.clear()
    with pytest.raises(ProcessDied):  # fewest deaths first: the good ones are embedded, then the poison
        pipelines.images_embed(image_ids=ids, delivery=delivery)
    assert seen == [*ids[1:], poison.pk]
    assert _attempts([poison, *good]) == [3, 0, 0, 0]
    assert ImageEmbedding.objects.filter(model_version=version).count() == 3


def test_a_retry_after_a_database_error_continues_its_attempt_and_a_redelivery_counts_again(version, monkeypatch):
    images = _catalog(3)
    ids = [image.pk for image in images]
    first = embeddings.EmbedDelivery(task_id="t-4", retries=0)
    retry = embeddings.EmbedDelivery(task_id="t-4", retries=1)  # what Celery's autoretry sends
    embeddings.embed_attempts_count(image_ids=ids, delivery=first)
    embeddings.embed_attempts_count(image_ids=ids, delivery=retry)
    assert _attempts(images) == [1, 1, 1]  # the database error burned nothing
    embeddings.embed_attempts_count(image_ids=ids, delivery=retry)  # the retry's worker died: redelivered
    assert _attempts(images) == [2, 2, 2]
    embeddings.embed_attempts_count(image_ids=ids, delivery=embeddings.EmbedDelivery(task_id="t-5"))  # the sweeper's
    assert _attempts(images) == [3, 3, 3]
    # a retry's claim does not read the attempt it continues as a death: below the cap, the batch is embedded whole
    work = embeddings.embed_work_claim(image_ids=ids, versions=[version], delivery=embeddings.EmbedDelivery("t-5", 1))
    assert (len(work.images), work.given_up, work.one_at_a_time) == (3, 0, True)  # 2 deaths each: one at a time


def test_the_task_retried_after_a_database_error_does_not_burn_an_attempt(version, monkeypatch):
    """The real task, run eagerly: its autoretry re-runs it with the same id and retries + 1."""
    images = _catalog(3)
    seen_attempts: list[int] = []
    real_open, real_record = selectors.image_open, embeddings.embeddings_record
    errors = iter([OperationalError("the server closed the connection unexpectedly")])

    def image_open(*, image: ProductImage, **kwargs):
        seen_attempts.append(ProductImage.objects.get(pk=image.pk).embed_attempts)
        return real_open(image=image, **kwargs)

    def embeddings_record(**kwargs):
        error = next(errors, None)
        if error is not None:
            raise error
        return real_record(**kwargs)

    monkeypatch.setattr(selectors, "image_open", image_open)
    monkeypatch.setattr(embeddings, "embeddings_record", embeddings_record)
    result = tasks.embed_images.apply(args=[[image.pk for image in images]]).get()

    assert seen_attempts == [1, 1, 1, 1, 1, 1]  # both tries read the images with one attempt counted, not two
    assert result["embedded"] == 3 and not result["one_at_a_time"]
    assert _attempts(images) == [0, 0, 0]


@pytest.mark.django_db(transaction=True)
def test_the_sweeper_fails_images_at_the_cap_instead_of_requeuing_them_and_the_indexing_can_finish(version):
    cap = django_settings.EMBED_MAX_ATTEMPTS
    spent, recent, done = _catalog(3)
    long_ago = timezone.now() - timezone.timedelta(seconds=maintenance.STUCK_AFTER_S + 60)
    ProductImage.objects.update(created_at=long_ago)  # a catalog being indexed is old
    # `spent`: begun `cap` times by deliveries that died, the last long ago (the hard limit ended it, acknowledged)
    ProductImage.objects.filter(pk=spent.pk).update(embed_attempts=cap, embed_attempted_at=long_ago)
    # `recent`: its last allowed attempt began just now and may still be running
    ProductImage.objects.filter(pk=recent.pk).update(embed_attempts=cap, embed_attempted_at=timezone.now())
    _embedded(done, version)
    _purge_embed()

    swept = maintenance.stuck_work_sweep()
    _purge_embed()  # what it queued: no worker here

    # `spent` failed, not re-queued; `recent` re-queued (its delivery decides); the indexing still waits for it
    assert (swept["given_up"], swept["images"], swept["finishing"]) == (1, 1, 0), swept
    spent.refresh_from_db()
    assert spent.status == ProductImage.Status.FAILED and spent.error == embeddings.embed_give_up_reason(cap)
    assert ProductImage.objects.get(pk=recent.pk).status == ProductImage.Status.PENDING
    _embedded(recent, version)  # its running delivery finished after all

    swept = maintenance.stuck_work_sweep()
    _purge_embed()

    # nothing to re-queue (the failed image is not waited for): the sweep finishes the indexing
    assert (swept["given_up"], swept["images"], swept["finishing"]) == (0, 0, 1), swept
    assert model_versions.model_version_finish_indexing(version=version)  # what the finishing task it sent does
    version.refresh_from_db()
    assert version.status == ModelVersion.Status.ACTIVE
    assert not ImageEmbedding.objects.filter(image=spent).exists()  # the failed image is not searchable under it


def _embedded(image: ProductImage, version: ModelVersion) -> None:
    factories.embedding(image=image, model_version=version, bits=np.ones(32, bool), fc7=np.ones(4, np.float32))
    embeddings.images_mark_embedded(image_ids=[image.pk])
