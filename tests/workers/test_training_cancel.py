"""Cancelling a training run: a running one stops between two steps in a real (prefork) worker and ends CANCELLED
with no version registered; a waiting one never starts; nothing is half-registered."""

import time
from pathlib import Path

import numpy as np
import pytest
from django.contrib.auth import get_user_model
from django.db import transaction

from catalog.models import ModelVersion, TrainingRun
from catalog.services import training
from shop_search.celery import app
from tests import factories
from tests.waiting import wait_until
from tests.workers import celery_process
from workers import pipelines

# The tiny network of the other training tests, with far more steps than the test waits for: it must be stopped.
LONG_TINY_RUN = {
    "epochs": 2,
    "steps_per_epoch": 5000,
    "instances_per_batch": 3,
    "views_per_instance": 2,
    "num_threads": 1,
    "augment": "mild",
    "model": {
        "backbone": "test_efficientnet", "packaged_weights": False, "input_size": 32, "local_channels": 8,
        "fc6_global_dim": 16, "fc6_local_dim": 8, "fc7_dim": 16, "code_bits": 32,
    },
}  # fmt: skip


def _catalog() -> None:
    merchant = factories.merchant()
    rng = np.random.default_rng(0)
    for i in range(4):
        product = factories.product(merchant, sku=f"S{i}", category="dress" if i % 2 else "bag")
        factories.image(product, f"p{i}", color=tuple(int(v) for v in rng.integers(0, 255, 3)))


@pytest.mark.django_db(transaction=True)
def test_a_running_run_cancelled_from_the_admin_stops_and_registers_nothing(client, tmp_path):
    _catalog()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    app.control.purge()
    with celery_process.worker_process(queues="train", name="train-cancel", env={"MODELS_DIR": str(tmp_path)}) as w:
        with transaction.atomic():
            run = training.training_run_start(run=TrainingRun(config=LONG_TINY_RUN))
        wait_until(
            lambda: celery_process.alive(w) and TrainingRun.objects.get(pk=run.pk).progress > 0,
            timeout=120, interval=0.3, message="the run never started",
        )  # fmt: skip
        client.post("/admin/catalog/trainingrun/", {"action": "cancel_runs", "_selected_action": [run.pk]})
        asked = time.monotonic()
        wait_until(
            lambda: celery_process.alive(w) and TrainingRun.objects.get(pk=run.pk).state == "cancelled",
            timeout=60, interval=0.3, message="the run did not stop",
        )  # fmt: skip
        stopped_after_s = time.monotonic() - asked

    run.refresh_from_db()
    assert run.state == TrainingRun.State.CANCELLED and run.cancel_requested and run.finished_at is not None
    assert run.progress < 0.5  # stopped well before the end
    assert run.model_version is None and not ModelVersion.objects.exists()
    assert not (Path(tmp_path) / "runs" / f"run-{run.pk}" / "model.pt").exists()  # no final checkpoint either
    assert stopped_after_s < 15  # the flag is read every TRAINING_PROGRESS_SAVE_S between steps


@pytest.mark.django_db(transaction=True)
def test_a_run_cancelled_while_it_waits_never_starts(settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    _catalog()
    run = TrainingRun.objects.create(config=LONG_TINY_RUN)
    assert training.training_run_cancel(run=run)
    run.refresh_from_db()
    assert run.state == TrainingRun.State.CANCELLED
    assert pipelines.training_run_execute(run_id=run.pk) is None  # the worker that takes it later does nothing
    run.refresh_from_db()
    assert run.state == TrainingRun.State.CANCELLED and run.progress == 0.0
    assert not any(Path(tmp_path).rglob("*.pt"))  # nothing trained
    assert not training.training_run_cancel(run=run)  # already over


@pytest.mark.django_db
def test_a_run_cancelled_after_its_last_step_registers_nothing(tmp_path):
    run = TrainingRun.objects.create(config={}, state=TrainingRun.State.RUNNING)
    training.training_run_cancel(run=run)
    finished = training.training_run_finish(run=run, checkpoint=tmp_path / "m.pt", code_bits=32, fc7_dim=16, config={})
    assert finished is None
    run.refresh_from_db()
    assert run.state == TrainingRun.State.CANCELLED and not ModelVersion.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("state", ["done", "failed", "cancelled"])
def test_a_finished_run_cannot_be_cancelled(state):
    run = TrainingRun.objects.create(config={}, state=state)
    assert not training.training_run_cancel(run=run)
    run.refresh_from_db()
    assert run.state == state and not run.cancel_requested
