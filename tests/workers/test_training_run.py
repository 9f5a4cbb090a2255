"""Retraining from the catalog on a real worker: export, train with the dashboard's defaults on a tiny catalog,
register a ready version with its curves."""

from pathlib import Path

import numpy as np
import pytest
from django.db import transaction

from catalog.admin import TrainingRunForm
from catalog.models import ModelVersion, TrainingRun
from catalog.services import golden, training
from shop_search.celery import app
from tests import factories
from tests.waiting import wait_until
from tests.workers import celery_process
from workers import pipelines
from workers.ml.datasets.factory import LANDMARK_HELDOUT_PRODUCTS, LANDMARK_HELDOUT_VIEWS
from workers.ml.training import START_EPOCH, TrainConfig

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


DEFAULT_RUN_PRODUCTS = 32  # a default batch takes 32 distinct products (P): the least the defaults train on


def _dashboard_default_config() -> dict:
    """What "Training runs -> Add" saves when the admin leaves every field at its default."""
    form = TrainingRunForm(data={"fine_tune_active": "on"})
    assert form.is_valid(), form.errors
    return form.run_config()


def _tiny_catalog(products: int) -> None:
    merchant = factories.merchant()
    rng = np.random.default_rng(0)
    for i in range(products):
        product = factories.product(merchant, sku=f"S{i}", category="dress" if i % 2 else "bag", attributes=["red"])
        factories.image(product, f"p{i}", color=tuple(int(v) for v in rng.integers(0, 255, 3)))
    hidden = factories.product(merchant, sku="hidden", active=False)
    factories.image(hidden, "hidden")


def _wait_finished(run: TrainingRun, worker, timeout_s: float) -> TrainingRun:
    def finished() -> bool:
        if TrainingRun.objects.get(pk=run.pk).state not in {"pending", "running"}:
            return True
        return not celery_process.alive(worker)

    wait_until(finished, timeout=timeout_s, interval=0.5, message=lambda: TrainingRun.objects.get(pk=run.pk).log)
    run.refresh_from_db()
    return run


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("pool", "mix"), [("prefork", None), ("solo", None), ("prefork", 0.0)])
def test_the_dashboards_default_run_trains_on_the_catalog_and_registers_a_ready_version(pool, mix, tmp_path):
    """The defaults exactly as the dashboard saves them (the network, its size, epochs, loader processes),
    in a real worker process: a prefork pool child is daemonic and may not start DataLoader processes. Rendered
    products are mixed into the catalog by default, so its landmark branch trains and is measured; and the same run
    on the catalog alone, as an admin may ask."""
    _tiny_catalog(DEFAULT_RUN_PRODUCTS)
    config = _dashboard_default_config()
    assert config == {}  # nothing overridden: TrainConfig's defaults are what runs
    if mix is not None:
        config = {"dataset": {"mix_rendered": mix}}
    app.control.purge()
    with celery_process.worker_process(queues="train", name=f"train-{pool}", pool=pool,
                                       env={"MODELS_DIR": str(tmp_path)}) as worker:  # fmt: skip
        with transaction.atomic():
            run = training.training_run_start(run=TrainingRun(config=config))
        run = _wait_finished(run, worker, timeout_s=300)
        # then the same task evaluates the new version on the golden set
        wait_until(
            lambda: not run.model_version_id or golden.version_golden(_version(run)) is not None, timeout=120,
            interval=0.5, message=lambda: _version(run).metrics,
        )  # fmt: skip

    assert run.state == TrainingRun.State.DONE, run.log
    defaults = TrainConfig()
    assert run.progress == 1.0
    # the start (version 0 fitted on the catalog, before any step), then every epoch
    assert [m["epoch"] for m in run.epoch_metrics] == [START_EPOCH, *range(defaults.epochs)]
    assert all(np.isfinite(m["loss"]) for m in run.epoch_metrics[1:])
    # the per-epoch golden check: held-out views of the catalog, searched with the network as each epoch left it
    assert all(0.0 <= m["golden_r1_cascade"] <= 1.0 and 0.0 <= m["golden_r1_fc7"] <= 1.0 for m in run.epoch_metrics)
    version = run.model_version
    assert version.kind == ModelVersion.Kind.FASHIONNET and version.status == ModelVersion.Status.READY
    # version 0's sizes: 256 bits, fc7 as wide as PCA on one photo per product allows
    assert version.code_bits == defaults.model["code_bits"]
    assert version.fc7_dim == min(defaults.model["fc7_dim"], DEFAULT_RUN_PRODUCTS - 1)
    # what was registered is the epoch best on the golden validation part, the start included
    best = max(m["golden_r1_cascade"] for m in run.epoch_metrics)
    first_best = [m["epoch"] for m in run.epoch_metrics if m["golden_r1_cascade"] == best][0]
    assert version.config["selected_epoch"] == first_best
    # the run now shows the whole configuration that ran: TrainConfig's defaults, with the catalog as its data
    assert run.config == version.config["training"]
    assert run.config["loader_workers"] == defaults.loader_workers and run.config["epochs"] == defaults.epochs
    assert run.config["dataset"]["name"] == "catalog-export"
    # rendered products mixed in by default teach the landmark branch (a catalog has no landmark labels)
    assert run.config["dataset"]["mix_rendered"] == (pipelines.RETRAIN_RENDERED_SHARE if mix is None else mix)
    mixed = run.config["dataset"]["mix_rendered"] > 0
    assert mixed == (mix is None)
    if mixed:
        assert all(m["landmarks"] > 0 and m["visibility"] > 0 for m in run.epoch_metrics[1:])  # after the start row
    # the train worker exported the network for the search and embed workers (ONNX Runtime is their default)
    onnx_path = Path(version.checkpoint).with_suffix(".onnx")
    assert onnx_path.exists() and version.config["path"] == str(onnx_path)
    manifest = (tmp_path / "runs" / f"run-{run.pk}" / "catalog" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == DEFAULT_RUN_PRODUCTS  # the inactive product is not trained on
    numbers = golden.version_golden(_version(run))
    assert numbers is not None, version.metrics
    assert numbers["queries"] == DEFAULT_RUN_PRODUCTS and 0.0 <= numbers["r1"] <= numbers["r10"] <= 1.0
    if mixed:  # and its landmark branch on held-out rendered products, beside the golden numbers
        assert 0.0 <= numbers["landmark_pck"] <= 1.0
        assert numbers["landmarks"]["images"] == LANDMARK_HELDOUT_PRODUCTS * LANDMARK_HELDOUT_VIEWS
    else:  # a catalog alone has no landmark labels: the network has no landmark branch to measure
        assert numbers.get("landmark_pck") is None


def _version(run: TrainingRun) -> ModelVersion:
    return ModelVersion.objects.get(pk=run.model_version_id)


@pytest.mark.django_db
def test_a_failed_run_says_why(settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    run = TrainingRun.objects.create(config=TINY_RUN)
    with pytest.raises(ValueError, match="no active product"):
        pipelines.training_run_execute(run_id=run.pk)
    run.refresh_from_db()
    assert run.state == TrainingRun.State.FAILED and "no active product" in run.log


def test_a_run_mixes_rendered_products_into_the_catalog_unless_it_chooses_otherwise(tmp_path):
    default = pipelines.retrain_dataset({}, tmp_path)
    assert default == {"name": "catalog-export", "directory": str(tmp_path), "mix_rendered": 0.25}
    assert pipelines.retrain_dataset({"dataset": {"mix_rendered": 0}}, tmp_path)["mix_rendered"] == 0.0


@pytest.mark.django_db
def test_a_shop_with_no_product_in_the_golden_validation_part_still_trains(settings, tmp_path):
    """Which golden part a product's views fall in is a hash of "<merchant id>/<sku>": a shop of a few products can
    have none in the validation part. The run then has no per-epoch check to choose on and keeps its last epoch (it
    used to save the empty check's NaN R@1, which PostgreSQL's JSON refuses, and fail)."""
    settings.MODELS_DIR = tmp_path
    merchant = factories.merchant()
    skus = [sku for sku in (f"T{i}" for i in range(64)) if pipelines.golden_split(f"{merchant.pk}/{sku}") == "test"]
    rng = np.random.default_rng(0)
    for i, sku in enumerate(skus[:4]):
        product = factories.product(merchant, sku=sku, category="dress" if i % 2 else "bag", attributes=["red"])
        factories.image(product, f"p{i}", color=tuple(int(v) for v in rng.integers(0, 255, 3)))
    run = TrainingRun.objects.create(config={**TINY_RUN, "dataset": {"mix_rendered": 0}})

    pipelines.training_run_execute(run_id=run.pk)

    run.refresh_from_db()
    assert run.state == TrainingRun.State.DONE, run.log
    assert _version(run).status == ModelVersion.Status.READY
    assert [m["epoch"] for m in run.epoch_metrics] == list(range(TINY_RUN["epochs"]))  # no start row: no selection
    assert not any("golden_r1_cascade" in m for m in run.epoch_metrics)


@pytest.mark.django_db
def test_a_metric_that_is_not_a_number_is_saved_as_null():
    run = TrainingRun.objects.create(config=TINY_RUN)
    rows = [{"epoch": 0, "loss": float("nan"), "parts": {"hash": float("inf"), "ok": 0.5}, "list": [float("-inf")]}]
    training.training_run_progress(run=run, progress=0.5, epoch_metrics=rows)
    run.refresh_from_db()
    assert run.epoch_metrics == [{"epoch": 0, "loss": None, "parts": {"hash": None, "ok": 0.5}, "list": [None]}]


class _Export(list):
    """What golden_epoch_sets reads of a catalog export: records by index, and (product number, path) items."""

    @property
    def items(self) -> list[tuple[int, str]]:
        return [(record.instance_id, f"{index}.png") for index, record in enumerate(self)]


def test_the_per_epoch_check_renders_only_the_validation_part_s_views(monkeypatch):
    from PIL import Image

    import workers.ml.heldout_queries as heldout_queries
    from workers.ml.records import Record

    rng = np.random.default_rng(0)
    export = _Export(
        Record(image=Image.new("RGB", (48, 48), tuple(int(v) for v in rng.integers(0, 200, 3))), instance_id=i,
               extra={"sku": f"1/S{i}"})
        for i in range(24)
    )  # fmt: skip
    both = pipelines.golden_epoch_sets(export)
    rendered = []
    real_heldout_query = heldout_queries.heldout_query

    def counting(*args, **kwargs):
        rendered.append(1)
        return real_heldout_query(*args, **kwargs)

    monkeypatch.setattr(heldout_queries, "heldout_query", counting)
    validation_only = pipelines.golden_epoch_sets(export, splits=("validation",))

    assert set(both) == {"validation", "test"} and set(validation_only) == {"validation"}
    assert len(both["test"][1]) > 0 and len(rendered) == len(both["validation"][1]) > 0  # the test part: not rendered
    same, alone = both["validation"][1], validation_only["validation"][1]
    assert [q.instance_id for q in same] == [q.instance_id for q in alone]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(same, alone, strict=True))
