"""Retraining from the catalog on a real worker: export, train (tiny), register a ready version with its curves."""

import time
from pathlib import Path

import numpy as np
import pytest
from celery.contrib.testing.worker import start_worker
from django.db import transaction

from catalog.models import ModelVersion, TrainingRun
from catalog.services import training
from shop_search.celery import app
from tests import factories
from workers import pipelines

# A tiny network (timm's test model, random init, 32 px): the flow is under test here, not the accuracy.
TINY_RUN = {
    "epochs": 2,
    "steps_per_epoch": 2,
    "instances_per_batch": 3,
    "views_per_instance": 2,
    "loader_workers": 0,
    "num_threads": 1,
    "augment": "mild",
    "model": {
        "backbone": "test_efficientnet",
        "packaged_weights": False,
        "input_size": 32,
        "local_channels": 8,
        "fc6_global_dim": 16,
        "fc6_local_dim": 8,
        "fc7_dim": 16,
        "code_bits": 32,
    },
}


@pytest.mark.django_db(transaction=True)
def test_a_training_run_trains_on_the_catalog_and_registers_a_ready_version(settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    merchant = factories.merchant()
    rng = np.random.default_rng(0)
    for i in range(4):
        product = factories.product(merchant, sku=f"S{i}", category="dress" if i % 2 else "bag", attributes=["red"])
        for view in range(2):
            factories.image(product, f"p{i}v{view}", color=tuple(int(v) for v in rng.integers(0, 255, 3)))
    hidden = factories.product(merchant, sku="hidden", active=False)
    factories.image(hidden, "hidden")

    app.control.purge()
    with start_worker(app, queues=["train"], pool="solo", perform_ping_check=False):
        with transaction.atomic():
            run = training.training_run_start(run=TrainingRun(config=TINY_RUN))
        deadline = time.monotonic() + 180
        while TrainingRun.objects.get(pk=run.pk).state in {"pending", "running"} and time.monotonic() < deadline:
            time.sleep(0.5)

    run.refresh_from_db()
    assert run.state == TrainingRun.State.DONE, run.log
    assert run.progress == 1.0
    assert [m["epoch"] for m in run.epoch_metrics] == [0, 1]
    assert all(np.isfinite(m["loss"]) for m in run.epoch_metrics)
    version = run.model_version
    assert version.kind == ModelVersion.Kind.FASHIONNET and version.status == ModelVersion.Status.READY
    assert (version.code_bits, version.fc7_dim) == (32, 16)
    assert version.config["training"]["epochs"] == 2
    # the run now shows the whole configuration that ran: the admin's choices over TrainConfig's defaults
    assert run.config == version.config["training"]
    assert run.config["epochs"] == 2 and run.config["lr"] > 0 and run.config["dataset"]["name"] == "catalog-export"
    # the train worker exported the network for the search and embed workers (ONNX Runtime is their default)
    onnx_path = Path(version.checkpoint).with_suffix(".onnx")
    assert onnx_path.exists() and version.config["path"] == str(onnx_path)
    manifest = (tmp_path / "runs" / f"run-{run.pk}" / "catalog" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 4  # the inactive product is not trained on


@pytest.mark.django_db
def test_a_failed_run_says_why(settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    run = TrainingRun.objects.create(config=TINY_RUN)
    with pytest.raises(ValueError, match="no active product"):
        pipelines.training_run_execute(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == TrainingRun.State.FAILED and "no active product" in run.log
