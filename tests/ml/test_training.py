import contextlib
import json
import multiprocessing

import numpy as np
import pytest
import torch

from tests.ml.ml_helpers import DEEPFASHION_INSHOP as INSHOP
from tests.ml.ml_helpers import LABELS, random_image, random_records, tiny_config
from workers.ml.checkpoint import load_checkpoint
from workers.ml.datasets.catalog_export import CatalogExport, CatalogProduct, write_catalog_export
from workers.ml.datasets.factory import evaluation_sets
from workers.ml.datasets.torch_dataset import prepare_record
from workers.ml.encoder import Encoder
from workers.ml.evaluation import evaluate_encoder
from workers.ml.losses import MultiTaskLoss
from workers.ml.model import FashionNet
from workers.ml.recipes import FINE_TUNE_STAGES, RECIPES
from workers.ml.records import collate
from workers.ml.training import (
    TrainConfig,
    build_model_config,
    loader_workers_usable,
    preprocessing_for,
    train,
    train_stages,
)


def _config(tmp_path, **overrides) -> TrainConfig:
    model = tiny_config().to_dict()
    for key in ("num_landmarks", "num_categories", "num_attributes"):
        model.pop(key)  # filled in from the dataset's label space
    fields = dict(
        out_dir=str(tmp_path / "run"),
        model=model,
        epochs=2,
        steps_per_epoch=3,
        instances_per_batch=4,
        views_per_instance=2,
        loader_workers=0,
        num_threads=1,
        augment="mild",
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _mixed_dataset() -> dict:
    """Mixed label availability: half the records have every label, half only instance ids."""
    labelled = random_records(8, seed=1, instances=4)
    bare = random_records(8, seed=2, instances=4, labelled=False)
    for record in bare:
        record.instance_id += 4
    return {"records": labelled + bare, "label_space": LABELS}


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    config = tiny_config(dropout=0.0)
    net = FashionNet(config)
    prep = preprocessing_for(config)
    records = random_records(8, instances=4)
    batch = collate([prepare_record(r, prep) for r in records], LABELS)
    criterion = MultiTaskLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        total, _ = criterion(net(batch["image"]), batch)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_train_writes_a_self_describing_checkpoint_and_metrics(tmp_path):
    events = []
    path = train(_config(tmp_path), **_mixed_dataset(), progress=events.append)
    checkpoint = torch.load(path, weights_only=True)  # plain types and tensors only
    assert checkpoint["kind"] == "fashionnet" and checkpoint["format_version"] == 1
    assert checkpoint["label_space"] == LABELS.to_dict()
    assert checkpoint["preprocessing"]["input_size"] == 32 and len(checkpoint["preprocessing"]["mean"]) == 3
    assert checkpoint["code_bits"] == 32 and checkpoint["fc7_dim"] == 32
    assert checkpoint["model_config"]["num_landmarks"] == LABELS.num_landmarks
    assert "training" not in checkpoint  # the final checkpoint carries no optimizer state
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert all(np.isfinite(line["loss"]) and "landmarks" in line for line in lines)
    assert any(event.get("done") for event in events) and events[-1]["epoch"] == 1


def test_training_is_deterministic_and_resumes_to_the_same_weights(tmp_path):
    straight = load_checkpoint(train(_config(tmp_path / "a"), **_mixed_dataset()))
    again = load_checkpoint(train(_config(tmp_path / "b"), **_mixed_dataset()))
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, again["state_dict"][key]), key  # same seed -> same weights

    # Interrupt after the first of two epochs, then run again: it resumes from last.pt.
    config = _config(tmp_path / "c")
    _train_one_epoch_then_stop(config)
    last = load_checkpoint(tmp_path / "c" / "run" / "last.pt")
    assert last["training"]["epoch"] == 0 and "optimizer" in last["training"]
    resumed = load_checkpoint(train(config, **_mixed_dataset()))
    for key, value in straight["state_dict"].items():
        assert torch.allclose(value.float(), resumed["state_dict"][key].float(), atol=1e-6), key


def _train_one_epoch_then_stop(config: TrainConfig) -> None:
    class Stop(Exception):
        pass

    def stop_after_first_epoch(event):
        if event.get("done"):
            raise Stop

    with contextlib.suppress(Stop):
        train(config, **_mixed_dataset(), progress=stop_after_first_epoch)


def test_init_checkpoint_starts_from_previous_weights(tmp_path):
    first = train(_config(tmp_path / "a", epochs=1), **_mixed_dataset())
    zero_steps = _config(tmp_path / "b", epochs=1, lr=0.0, init_checkpoint=str(first))
    continued = load_checkpoint(train(zero_steps, **_mixed_dataset()))
    before = load_checkpoint(first)["state_dict"]
    # With lr 0 only BatchNorm running statistics may move; every learned weight is the initial one.
    for key, value in before.items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, continued["state_dict"][key]), key


def test_init_checkpoint_with_another_code_length_starts_a_fresh_hash_layer(tmp_path):
    first = train(_config(tmp_path / "a", epochs=1), **_mixed_dataset())
    before = load_checkpoint(first)
    bits = before["model_config"]["code_bits"] * 2
    model = {**_config(tmp_path).model, "code_bits": bits}
    wider = _config(tmp_path / "b", epochs=1, lr=0.0, model=model, init_checkpoint=str(first))
    continued = load_checkpoint(train(wider, **_mixed_dataset()))
    assert continued["state_dict"]["hash.weight"].shape[0] == bits
    for key, value in before["state_dict"].items():
        if not key.startswith("hash.") and "running" not in key and "num_batches" not in key:
            assert torch.equal(value, continued["state_dict"][key]), key


def test_trains_on_deepfashion_inshop_and_evaluates_query_photos_against_the_gallery(tmp_path):
    """A user with DeepFashion trains and measures with the same commands (here on the format fixture)."""
    config = _config(
        tmp_path, dataset={"name": "deepfashion-inshop", "root": str(INSHOP)}, epochs=1, instances_per_batch=2
    )
    path = train(config)
    checkpoint = load_checkpoint(path)
    # the label space spans every split, so gallery and query records carry the categories training knew
    assert checkpoint["label_space"]["categories"] == ["MEN/Denim", "WOMEN/Blouses_Shirts", "WOMEN/Dresses"]
    assert checkpoint["label_space"]["num_landmarks"] == 8 and len(checkpoint["label_space"]["attributes"]) == 3
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and np.isfinite(json.loads(lines[0])["landmarks"])

    sets = evaluation_sets("deepfashion-inshop", catalog_size=10, num_queries=10, root=INSHOP)
    assert [r.extra["split"] for r in sets.catalog] == ["gallery"]
    assert [r.extra["split"] for r in sets.queries] == ["query"]  # the benchmark's real photos, not augmented
    assert sets.queries[0].instance_id == sets.catalog[0].instance_id
    report = evaluate_encoder(Encoder.load(path), sets.catalog, sets.queries)
    assert report["fc7"]["R@1"] == 1.0  # a one-item gallery: the plumbing, not the network, is under test
    assert 0.0 <= report["landmark_pck@0.1"] <= 1.0


def test_deepfashion_needs_its_data_root(tmp_path):
    with pytest.raises(ValueError, match="needs the folder"):
        train(_config(tmp_path, dataset={"name": "deepfashion-inshop"}))
    with pytest.raises(ValueError, match="needs the folder"):
        evaluation_sets("deepfashion-inshop", catalog_size=1, num_queries=1)


def test_from_overrides_lays_each_mapping_over_the_defaults():
    assert TrainConfig.from_overrides() == TrainConfig()
    config = TrainConfig.from_overrides(
        RECIPES["renderer"],
        {"epochs": 1, "model": {"code_bits": 32}, "loss_weights": {"landmarks": 1}, "dataset": {"name": "x"}},
    )
    assert config.epochs == 1 and config.lr == RECIPES["renderer"]["lr"]
    assert config.model == {**TrainConfig().model, **RECIPES["renderer"]["model"], "code_bits": 32}  # key by key
    assert config.model["input_size"] == 64 and not config.start_from_version0  # the recipe's, not the shop's
    assert config.loss_weights == {**RECIPES["renderer"]["loss_weights"], "landmarks": 1}
    assert config.dataset == {"name": "x"}  # replaced whole: a spec's keys depend on its name
    config.model["input_size"] = 96
    assert RECIPES["renderer"]["model"]["input_size"] == 64  # the config does not share the recipe's dicts
    assert TrainConfig.from_overrides(config.to_dict()) == config
    assert TrainConfig.from_overrides(FINE_TUNE_STAGES["fashion-mnist"][0]) == TrainConfig.from_dict(
        FINE_TUNE_STAGES["fashion-mnist"][0]
    )
    with pytest.raises(TypeError):
        TrainConfig.from_overrides({"epoch": 3})


def test_the_admins_retraining_defaults_are_the_train_config_defaults():
    """What a TrainingRun without overrides trains (the recipe chosen with bench_shop_recipe, docs/benchmarks.md):
    2 epochs of P=32 x K=2, strong shopper views, 2 threads, starting as version 0 (224 px, 256-bit codes) with the
    backbone's last two blocks trained and the best epoch on validation kept."""
    config = TrainConfig.from_overrides({})
    assert (config.epochs, config.instances_per_batch, config.views_per_instance) == (2, 32, 2)
    assert (config.augment, config.num_threads) == ("strong", 2)
    assert (config.start_from_version0, config.trainable_blocks, config.select_on_validation) == (True, 2, True)
    model = build_model_config(config, LABELS)
    assert (model.input_size, model.code_bits) == (224, 256)


def test_train_stages_fine_tunes_each_stage_from_the_previous_one(tmp_path):
    first = _config(
        tmp_path / "a", dataset={"name": "deepfashion-inshop", "root": str(INSHOP)}, epochs=1, instances_per_batch=2
    )
    second = {**first.to_dict(), "out_dir": str(tmp_path / "b"), "lr": 0.0}
    paths = train_stages([first.to_dict(), second])
    assert paths == [tmp_path / "a" / "run" / "model.pt", tmp_path / "b" / "model.pt"]
    assert load_checkpoint(paths[1])["metrics"]["train_config"]["init_checkpoint"] == str(paths[0])


def test_trains_on_a_catalog_export_named_in_the_config(tmp_path):
    """The admin's retraining records its data as {"name": "catalog-export", "directory": ...}: that config
    trains again from the command line."""
    products = [
        CatalogProduct(f"sku-{i}", "ab"[i % 2], ("red",) if i % 3 else (), "", [random_image(rng, (30, 40))] * 2)
        for i, rng in enumerate(np.random.default_rng(seed) for seed in range(4))
    ]
    directory = write_catalog_export(tmp_path / "export", products).parent
    config = _config(tmp_path, dataset={"name": "catalog-export", "directory": str(directory)}, instances_per_batch=2)
    checkpoint = load_checkpoint(train(config))
    assert checkpoint["label_space"] == CatalogExport(directory).label_space.to_dict()
    assert checkpoint["label_space"]["categories"] == ["a", "b"]
    with pytest.raises(ValueError, match="needs the export's folder"):
        train(_config(tmp_path, dataset={"name": "catalog-export"}))


def _loader_workers_in_child(requested: int, answer: multiprocessing.SimpleQueue) -> None:
    answer.put(loader_workers_usable(requested))


def test_loader_workers_fall_back_to_the_training_process_inside_a_daemonic_process():
    # a Celery prefork pool child is daemonic: starting DataLoader processes there fails
    assert loader_workers_usable(2) == 2
    answer: multiprocessing.SimpleQueue = multiprocessing.SimpleQueue()
    child = multiprocessing.get_context("fork").Process(target=_loader_workers_in_child, args=(2, answer), daemon=True)
    child.start()
    child.join(timeout=30)
    assert answer.get() == 0
