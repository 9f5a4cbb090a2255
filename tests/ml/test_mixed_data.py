"""A shop's catalog with rendered products mixed in: one label space, the shop's names first, and every loss
applied only where its label is known (landmarks on rendered samples only, attributes per vocabulary)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.ml.ml_helpers import tiny_config
from workers.ml.checkpoint import load_checkpoint
from workers.ml.datasets import render
from workers.ml.datasets.catalog_export import CatalogProduct, write_catalog_export
from workers.ml.datasets.factory import build_dataset, landmark_heldout_views, rendered_products_to_mix
from workers.ml.datasets.mixed import MixedRecords, merged_label_space
from workers.ml.encoder import Encoder
from workers.ml.evaluation import landmark_report
from workers.ml.losses import MultiTaskLoss
from workers.ml.model import FashionNet
from workers.ml.records import LabelSpace, Record
from workers.ml.training import TrainConfig, build_model_config, epoch_loader, preprocessing_for, train

SHOP_PRODUCTS = 12
SHARE = 0.5  # as many rendered products as the shop's: small batches still hold both


def _shop_export(tmp_path):
    """A shop's catalog: its own category and attribute names (one shared with the renderer), no landmarks."""
    rng = np.random.default_rng(0)
    products = [
        CatalogProduct(
            f"sku-{i}",
            ("dress", "hat")[i % 2],
            ("colour:red", "shop:linen") if i % 3 else ("shop:linen",),
            f"product {i}",
            [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(2)],
        )
        for i in range(SHOP_PRODUCTS)
    ]
    return write_catalog_export(tmp_path / "export", products).parent


def _mixed(tmp_path) -> MixedRecords:
    data = build_dataset({"name": "catalog-export", "directory": str(_shop_export(tmp_path)), "mix_rendered": SHARE})
    assert isinstance(data.records, MixedRecords) and data.label_space == data.records.label_space
    return data.records


def _config(tmp_path, **overrides) -> TrainConfig:
    model = tiny_config().to_dict()
    for key in ("num_landmarks", "num_categories", "num_attributes"):
        model.pop(key)
    fields = dict(
        out_dir=str(tmp_path / "run"), model=model, epochs=2, steps_per_epoch=2, instances_per_batch=8,
        views_per_instance=2, loader_workers=0, num_threads=1, augment="mild",
    )  # fmt: skip
    return TrainConfig(**{**fields, **overrides})


def test_the_shops_names_come_first_and_shared_names_are_one_class():
    shop = LabelSpace(("dress", "hat"), ("colour:red", "shop:linen"), 0)
    merged = merged_label_space([shop, render.LABEL_SPACE])
    assert merged.categories[:2] == ("dress", "hat") and merged.categories.count("dress") == 1
    assert set(merged.categories) == {"hat", *render.CATEGORIES}
    assert merged.attributes[:2] == ("colour:red", "shop:linen") and merged.attributes.count("colour:red") == 1
    assert merged.num_landmarks == render.LABEL_SPACE.num_landmarks
    with pytest.raises(ValueError, match="landmark layouts"):
        merged_label_space([LabelSpace((), (), 4), render.LABEL_SPACE])


def test_a_catalog_export_with_rendered_products_mixed_in(tmp_path):
    records = _mixed(tmp_path)
    space = records.label_space
    rendered_products = rendered_products_to_mix(SHOP_PRODUCTS, SHARE)
    assert rendered_products == SHOP_PRODUCTS
    assert len(records) == SHOP_PRODUCTS * 2 + rendered_products * 2  # two photos of each, two views of each
    ids = records.instance_ids
    assert len(np.unique(ids)) == SHOP_PRODUCTS + rendered_products  # no rendered product shares a shop product's id
    assert ids.tolist() == [records[i].instance_id for i in range(len(records))]
    linen, red = space.attributes.index("shop:linen"), space.attributes.index("colour:red")
    striped = space.attributes.index("pattern:stripes")

    shop = records[2]  # sku-1: a hat, red linen
    assert shop.landmarks is None and space.categories[shop.category] == "hat"
    assert shop.attributes[linen] == 1 and shop.attributes[red] == 1
    assert np.isnan(shop.attributes[striped])  # the shop does not label the renderer's attributes
    assert np.isnan(shop.attributes).sum() == len(space.attributes) - 2

    rendered = records[SHOP_PRODUCTS * 2]
    spec = render.product_spec(render.TRAIN_FIRST_SEED)
    assert rendered.landmarks.shape == (render.LABEL_SPACE.num_landmarks, 2) and rendered.visibility is not None
    assert space.categories[rendered.category] == spec.category  # the renderer's names, re-indexed
    assert np.isnan(rendered.attributes[linen])  # and it says nothing about the shop's own attributes
    assert {space.attributes[i] for i in np.flatnonzero(rendered.attributes == 1)} == set(spec.attribute_names)


def test_a_mixed_batch_teaches_landmarks_on_rendered_samples_only(tmp_path):
    """The real training batch (the P x K loader of train()): the landmark loss and its gradient reach the rendered
    samples and none of the shop's; each attribute is taught only where the sample's vocabulary labels it."""
    records = _mixed(tmp_path)
    space = records.label_space
    config = _config(tmp_path, instances_per_batch=12)
    model_config = build_model_config(config, space)
    batch = next(iter(epoch_loader(records, space, config, preprocessing_for(model_config), 0)))
    rendered = batch["instance"] >= SHOP_PRODUCTS  # the shop's product numbers come first
    # P = 12 of the shop's products, and the rendered ones on top in their share (half the products here)
    assert len(batch["instance"][~rendered].unique()) == 12 and len(batch["instance"][rendered].unique()) == 12
    assert torch.equal(batch["landmarks_mask"], rendered)

    torch.manual_seed(0)
    output = FashionNet(model_config)(batch["image"])
    _, parts = MultiTaskLoss()(output, batch)
    assert parts["landmarks"].item() > 0 and parts["visibility"].item() > 0
    (landmark_grad,) = torch.autograd.grad(parts["landmarks"], output.landmarks, retain_graph=True)
    assert landmark_grad[~rendered].abs().sum() == 0
    assert (landmark_grad[rendered].abs().sum(dim=(1, 2)) > 0).all()

    # the rendered products stay out of the shop's metric space: no triplet (nor hash triplet) gradient reaches them
    assert torch.equal(batch["metric"], ~rendered)
    for name, vectors in (("triplet", output.embedding), ("hash_triplet", output.hash_probs)):
        (metric_grad,) = torch.autograd.grad(parts[name], vectors, retain_graph=True)
        assert metric_grad[rendered].abs().sum() == 0, name
        assert metric_grad[~rendered].abs().sum() > 0, name

    (attribute_grad,) = torch.autograd.grad(parts["attributes"], output.attribute_logits)
    shop_only = torch.tensor([name.startswith("shop:") for name in space.attributes])
    assert attribute_grad[rendered][:, shop_only].abs().sum() == 0
    assert (
        attribute_grad[~rendered][:, ~shop_only & ~torch.tensor([n == "colour:red" for n in space.attributes])]
        .abs()
        .sum()
        == 0
    )
    assert (attribute_grad[~rendered][:, shop_only] != 0).all() and (attribute_grad[rendered][:, ~shop_only] != 0).any()


def test_rendered_products_join_the_metric_space_only_when_asked(tmp_path):
    directory = _shop_export(tmp_path)
    spec = {"name": "catalog-export", "directory": str(directory), "mix_rendered": SHARE}
    inside = build_dataset({**spec, "rendered_metric": True}).records
    outside = build_dataset(spec).records
    shop, rendered = 0, SHOP_PRODUCTS * 2
    assert outside[shop].metric and not outside[rendered].metric
    assert inside[shop].metric and inside[rendered].metric
    assert outside[rendered].instance_id == inside[rendered].instance_id  # the sampler still groups its views
    with pytest.raises(ValueError, match="one flag per part"):
        MixedRecords([(outside.parts[0], outside.label_space)], metric_parts=(True, False))


@pytest.mark.parametrize("tune", [True, False])
def test_the_landmark_losses_reach_the_backbone_only_when_it_is_tuned_by_them(tune):
    space = render.LABEL_SPACE
    model_config = tiny_config(
        num_landmarks=space.num_landmarks, num_categories=len(space.categories), num_attributes=len(space.attributes),
        landmarks_tune_backbone=tune,
    )  # fmt: skip
    torch.manual_seed(0)
    model = FashionNet(model_config)
    output = model(torch.randn(4, 3, model_config.input_size, model_config.input_size))
    loss = output.landmarks.sum() + output.visibility_logits.sum()
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    branch = list(model.heatmap.parameters())
    grads = torch.autograd.grad(loss, backbone + branch, allow_unused=True)
    backbone_grad = sum(float(g.abs().sum()) for g in grads[: len(backbone)] if g is not None)
    assert all(g is not None and g.abs().sum() > 0 for g in grads[len(backbone) :])  # the branch itself learns
    assert (backbone_grad > 0) == tune


def test_training_on_the_mix_learns_landmarks_from_the_rendered_products(tmp_path):
    directory = _shop_export(tmp_path)
    spec = {"name": "catalog-export", "directory": str(directory), "mix_rendered": SHARE}
    checkpoint = load_checkpoint(train(_config(tmp_path, dataset=spec)))
    assert checkpoint["label_space"]["num_landmarks"] == render.LABEL_SPACE.num_landmarks
    assert checkpoint["label_space"]["categories"][:2] == ["dress", "hat"]
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(epoch["landmarks"] > 0 and np.isfinite(epoch["attributes"]) for epoch in epochs)

    alone = load_checkpoint(train(_config(tmp_path / "alone", dataset={**spec, "mix_rendered": 0})))
    assert alone["label_space"]["num_landmarks"] == 0  # a catalog alone has no landmarks to learn
    # a shop retrain that starts from that version grows a landmark branch (its backbone carried over)
    grown = load_checkpoint(
        train(_config(tmp_path / "grown", dataset=spec, lr=0.0, init_checkpoint=str(tmp_path / "alone/run/model.pt")))
    )
    assert any(key.startswith("heatmap.") for key in grown["state_dict"])
    for key, value in alone["state_dict"].items():
        if key.startswith("backbone.") and "running" not in key and "num_batches" not in key:
            assert torch.equal(value, grown["state_dict"][key]), key


def test_landmark_report_on_held_out_renders():
    views = landmark_heldout_views(products=4, views=2)
    assert len(views) == 8 and all(r.instance_id >= render.LANDMARK_HELDOUT_FIRST_SEED for r in views)
    space = render.LABEL_SPACE
    model_config = tiny_config(
        num_landmarks=space.num_landmarks, num_categories=len(space.categories), num_attributes=len(space.attributes)
    )
    torch.manual_seed(0)
    encoder = Encoder.from_model(
        FashionNet(model_config), label_space=space, preprocessing=preprocessing_for(model_config)
    )
    report = landmark_report(encoder, views)
    visible = int(sum((r.visibility > 0.5).sum() for r in views))
    assert report is not None and report["images"] == 8 and report["landmarks"] == visible
    assert 0.0 <= report["pck"] <= 1.0
    without = tiny_config(num_landmarks=0, num_categories=len(space.categories), num_attributes=0)
    no_branch = Encoder.from_model(FashionNet(without), label_space=space, preprocessing=preprocessing_for(without))
    assert landmark_report(no_branch, views) is None
    with pytest.raises(ValueError, match="landmarks and visibility"):
        landmark_report(encoder, [Record(views[0].image)])
