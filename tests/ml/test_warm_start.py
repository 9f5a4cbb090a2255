"""A shop's retrain starts as its version 0 (workers.ml.warm_start) and registers only what measures better on the
golden validation part (workers.ml.training's selection): on rendered products and held-out shopper views, with the
packaged ImageNet backbone at 224 px, as the dashboard's default runs."""

import numpy as np
import pytest
import torch

from tests.ml.ml_helpers import LABELS, random_records, tiny_config
from workers.ml.baseline import fit_baseline
from workers.ml.checkpoint import load_checkpoint
from workers.ml.datasets.render import render_product
from workers.ml.encoder import Encoder
from workers.ml.evaluation import RetrievalInputs, retrieval_report, retrieval_validator
from workers.ml.heldout_queries import heldout_query
from workers.ml.model import FashionNet, FashionNetConfig
from workers.ml.preprocess import Preprocessing, preprocess_batch
from workers.ml.records import LabelSpace, Record
from workers.ml.training import LAST_CHECKPOINT, START_EPOCH, TrainConfig, read_metrics, train

PRODUCTS = 16
FIRST_SEED = 40_000_000  # the renderer's evaluation range (workers.ml.datasets.render.EVAL_FIRST_SEED)
SIZE = 128
CATEGORIES = LabelSpace(categories=("item",), attributes=(), num_landmarks=0)


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """Catalog photos (two views of each product), version 0 fitted on them, and held-out shopper views of a third."""
    catalog, queries = [], []
    for number in range(PRODUCTS):
        seed = FIRST_SEED + number
        for view in range(2):
            catalog.append(Record(image=render_product(seed, view, SIZE).image, instance_id=number, category=0))
        rng = np.random.default_rng([11, number])
        photo = heldout_query(render_product(seed, 2, SIZE).image, rng, occluders=[], strength="heldout-mild")
        queries.append(Record(image=photo, instance_id=number, category=0))
    version0 = fit_baseline(
        [r.image for r in catalog], out_path=tmp_path_factory.mktemp("v0") / "v0.pt", categories=["item"] * len(catalog)
    )
    gallery = catalog[::2]  # the main photo of each product, as the golden check searches
    return {"records": catalog, "gallery": gallery, "queries": queries, "version0": version0}


def _report(encoder: Encoder, gallery, queries) -> tuple[dict, np.ndarray, np.ndarray]:
    catalog = encoder.encode([r.image for r in gallery])
    asked = encoder.encode([r.image for r in queries])
    instances = np.array([r.instance_id for r in gallery])
    report = retrieval_report(
        RetrievalInputs(asked.fc7, asked.codes, np.array([r.instance_id for r in queries])),
        RetrievalInputs(catalog.fc7, catalog.codes, instances),
    )
    distances = ((asked.fc7[:, None, :] - catalog.fc7[None, :, :]) ** 2).sum(axis=2)
    return report, instances[np.argsort(distances, axis=1, kind="stable")], np.concatenate([catalog.codes, asked.codes])


def _config(tmp_path, shop, **overrides) -> TrainConfig:
    fields = dict(
        out_dir=str(tmp_path / "run"),
        init_checkpoint=str(shop["version0"]),
        steps_per_epoch=2,
        instances_per_batch=4,
        loader_workers=0,
        num_threads=2,
        augment="mild",
    )
    return TrainConfig.from_overrides(fields, overrides)


def test_the_warm_start_ranks_shopper_photos_as_version_0_does(tmp_path, shop):
    validate = retrieval_validator(shop["gallery"], shop["queries"], CATEGORIES)
    checkpoint = train(_config(tmp_path, shop, epochs=0), records=shop["records"], label_space=CATEGORIES,
                       validate=validate)  # fmt: skip
    started = load_checkpoint(checkpoint)
    assert started["kind"] == "fashionnet" and started["metrics"]["selected_epoch"] == START_EPOCH
    network, version0 = Encoder.load(checkpoint), Encoder.load(shop["version0"])
    assert (network.code_bits, network.fc7_dim) == (version0.code_bits, version0.fc7_dim)

    trained_report, trained_ranking, trained_codes = _report(network, shop["gallery"], shop["queries"])
    v0_report, v0_ranking, v0_codes = _report(version0, shop["gallery"], shop["queries"])
    assert 0.0 < v0_report["cascade"]["R@1"] < 1.0  # held-out views: a real ranking, some found first, some not
    np.testing.assert_array_equal(trained_ranking, v0_ranking)  # every product in the same place for every photo
    assert (trained_codes == v0_codes).mean() > 0.999  # the code bits too (a bit at exactly 0 may round either way)
    for mode in ("fc7", "hamming", "cascade"):
        assert trained_report[mode]["R@1"] == pytest.approx(v0_report[mode]["R@1"])
        assert trained_report[mode]["R@10"] == pytest.approx(v0_report[mode]["R@10"])
    # the run's own start row is that number: what selection compares every epoch against
    (start_row,) = read_metrics(tmp_path / "run")
    assert start_row["epoch"] == START_EPOCH
    assert start_row["validation"]["cascade"] == pytest.approx(v0_report["cascade"]["R@1"], abs=1e-4)


def test_a_run_that_only_gets_worse_registers_its_start_and_trains_only_the_last_blocks(tmp_path, shop):
    """A learning rate 1,000x the default wrecks the network: the run must register version 0's function."""
    validate = retrieval_validator(shop["gallery"], shop["queries"], CATEGORIES)
    config = _config(tmp_path, shop, epochs=2, lr=1.0)
    checkpoint = train(config, records=shop["records"], label_space=CATEGORIES, validate=validate)

    rows = read_metrics(tmp_path / "run")
    start, *epochs = [row["validation"]["cascade"] for row in rows]
    assert [row["epoch"] for row in rows] == [START_EPOCH, 0, 1]
    assert max(epochs) < start  # the training did get worse: this test could fail
    assert load_checkpoint(checkpoint)["metrics"]["selected_epoch"] == START_EPOCH
    registered, _, _ = _report(Encoder.load(checkpoint), shop["gallery"], shop["queries"])
    version0, _, _ = _report(Encoder.load(shop["version0"]), shop["gallery"], shop["queries"])
    assert registered["cascade"]["R@1"] == pytest.approx(version0["cascade"]["R@1"])

    # what trained: the last two backbone blocks, the conv head and the heads; the rest, and every BatchNorm
    # statistic, held
    trained = load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)["state_dict"]
    start_state = load_checkpoint(checkpoint)["state_dict"]
    for key, value in trained.items():
        if "running_" in key or (
            key.startswith("backbone.") and not key.startswith(("backbone.blocks.5", "backbone.blocks.6"))
        ):
            assert torch.equal(value, start_state[key]), key
    assert not torch.equal(
        trained["backbone.blocks.6.0.conv_pwl.weight"], start_state["backbone.blocks.6.0.conv_pwl.weight"]
    )
    assert not torch.equal(trained["hash.weight"], start_state["hash.weight"])


def test_selection_registers_the_best_epoch_and_a_tie_keeps_the_earlier(tmp_path):
    """The rule on scripted validation scores (a tiny network, no version 0): strictly better wins."""
    scores = iter([0.30, 0.50, 0.50, 0.40])  # start, epochs 0, 1, 2: epoch 0 is best, epoch 1 only ties it
    model = {k: v for k, v in tiny_config().to_dict().items() if not k.startswith("num_")}
    config = TrainConfig.from_overrides(
        dict(out_dir=str(tmp_path / "run"), model=model, epochs=3, steps_per_epoch=1, instances_per_batch=4,
             loader_workers=0, num_threads=1, augment="mild", trainable_blocks=-1),
    )  # fmt: skip
    checkpoint = train(
        config, records=random_records(8, instances=4), label_space=LABELS,
        validate=lambda model, prep: {"cascade": next(scores)},
    )  # fmt: skip
    assert load_checkpoint(checkpoint)["metrics"]["selected_epoch"] == 0
    assert load_checkpoint(checkpoint)["metrics"]["validation"] == {"cascade": 0.5}


def test_a_landmark_branch_enters_fc7_at_version_0s_scale(tmp_path, shop):
    """fc7 starts reading the landmark part through zero weights; the part itself is scaled to version 0's fc7
    components (a few hundredths), not BatchNorm's unit scale, so a few AdamW steps cannot let it swamp them."""
    space = LabelSpace(categories=("item",), attributes=(), num_landmarks=8)
    validate = retrieval_validator(shop["gallery"], shop["queries"], space)
    checkpoint = load_checkpoint(
        train(_config(tmp_path, shop, epochs=0), records=shop["records"], label_space=space, validate=validate)
    )
    assert checkpoint["metrics"]["selected_epoch"] == START_EPOCH
    model = FashionNet(FashionNetConfig.from_dict(checkpoint["model_config"]))
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    raw: list[torch.Tensor] = []
    model.fc7.register_forward_hook(lambda _module, _inputs, output: raw.append(output))
    images, _ = preprocess_batch(
        [r.image for r in shop["records"]], Preprocessing.from_dict(checkpoint["preprocessing"])
    )
    with torch.no_grad():
        model(images)
    version0_rms = float(raw[0].pow(2).mean().sqrt())  # the landmark part is still 0: fc7_raw is version 0's z
    assert version0_rms < 0.2  # what makes the unit scale a problem
    scale = checkpoint["state_dict"]["fc6_local.1.weight"]
    assert torch.allclose(scale, torch.full_like(scale, version0_rms), rtol=0.25)
    assert checkpoint["state_dict"]["fc7.0.weight"][:, -model.config.fc6_local_dim :].abs().sum() == 0
