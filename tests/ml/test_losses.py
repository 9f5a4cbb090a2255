import numpy as np
import pytest
import torch

from tests.ml.ml_helpers import LABELS, random_records, tiny_config
from workers.ml.losses import (
    LossWeights,
    MultiTaskLoss,
    attribute_loss,
    attribute_pos_weight,
    batch_hard_triplet_loss,
    category_loss,
    contrastive_loss,
    hash_balance_loss,
    hash_quantization_loss,
    infonce_loss,
    landmark_loss,
    visibility_loss,
)
from workers.ml.model import FashionNet
from workers.ml.records import collate


def _batch(records):
    return collate([(torch.randn(3, 32, 32), r) for r in records], LABELS)


def test_batch_without_any_labels_gives_exact_zeros_and_backward_works():
    records = random_records(4, labelled=False)
    for record in records:
        record.instance_id = -1
    batch = _batch(records)
    net = FashionNet(tiny_config())
    weights = LossWeights(hash_quantization=0, hash_balance=0, contrastive=1.0, infonce=1.0, hash_infonce=1.0)
    total, parts = MultiTaskLoss(weights)(net(batch["image"]), batch)
    for name in (
        "landmarks",
        "visibility",
        "category",
        "attributes",
        "triplet",
        "contrastive",
        "infonce",
        "hash_infonce",
        "hash_triplet",
    ):
        assert parts[name].item() == 0.0, name
    assert total.item() == 0.0 and not torch.isnan(total)
    total.backward()  # still connected to the graph
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_batch_without_landmarks_has_zero_landmark_loss_but_other_losses_count():
    records = random_records(6, instances=3)
    for record in records:
        record.landmarks = record.visibility = None
    batch = _batch(records)
    assert not batch["landmarks_mask"].any()
    total, parts = MultiTaskLoss()(FashionNet(tiny_config())(batch["image"]), batch)
    assert parts["landmarks"].item() == 0.0 and parts["visibility"].item() == 0.0
    assert parts["category"].item() > 0 and parts["triplet"].item() > 0
    assert torch.isfinite(total)


def test_landmark_loss_ignores_invisible_points_and_unlabelled_samples():
    target = torch.zeros(2, 2, 2)
    predicted = torch.zeros(2, 2, 2)
    predicted[0, 1] = 0.5  # invisible point: error ignored
    predicted[1, 0] = 0.5  # sample without landmarks: error ignored
    visibility = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    mask = torch.tensor([True, False])
    assert landmark_loss(predicted, target, visibility, mask).item() == 0.0
    predicted[0, 0] = 0.5
    assert landmark_loss(predicted, target, visibility, mask).item() > 0
    assert visibility_loss(torch.zeros(2, 2), visibility, torch.tensor([False, False])).item() == 0.0


def test_category_ignores_unknown_and_attribute_loss_is_weighted():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert category_loss(logits, torch.tensor([-1, -1])).item() == 0.0
    assert category_loss(logits, torch.tensor([0, -1])).item() < 0.01
    pos_weight = attribute_pos_weight(torch.tensor([0.5, 0.01]))
    assert pos_weight[0] == 1.0 and pos_weight[1] > 10
    labels = torch.tensor([[1.0, 1.0]])
    mask = torch.tensor([True])
    plain = attribute_loss(torch.zeros(1, 2), labels, mask)
    weighted = attribute_loss(torch.zeros(1, 2), labels, mask, pos_weight)
    assert weighted > plain
    assert attribute_loss(torch.zeros(1, 2), labels, torch.tensor([False])).item() == 0.0


def test_triplet_and_contrastive_are_zero_when_instances_are_well_separated():
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    instance = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet_loss(embeddings, instance).item() == 0.0
    assert contrastive_loss(embeddings, instance).item() < 1e-6
    swapped = torch.tensor([0, 1, 0, 1])
    assert batch_hard_triplet_loss(embeddings, swapped).item() > 1.0
    assert batch_hard_triplet_loss(embeddings, torch.tensor([0, 1, 2, 3])).item() == 0.0  # no positives


def test_hash_losses_prefer_saturated_balanced_bits():
    saturated = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    undecided = torch.full((2, 2), 0.5)
    assert hash_quantization_loss(saturated).item() == 0.0
    assert abs(hash_quantization_loss(undecided).item() - 0.25) < 1e-7
    assert hash_balance_loss(saturated).item() == 0.0
    assert hash_balance_loss(torch.ones(2, 2)).item() == 0.25


def test_infonce_prefers_matching_instances_and_ignores_unknown():
    matched = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    crossed = matched[[0, 2, 1, 3]]
    instance = torch.tensor([0, 0, 1, 1])
    assert infonce_loss(matched, instance) < infonce_loss(crossed, instance)
    assert infonce_loss(matched, torch.tensor([-1, -1, -1, -1])).item() == 0.0


def test_attributes_outside_a_samples_vocabulary_are_not_taught():
    """NaN marks an attribute the record's source does not label (a shop's catalog mixed with rendered products)."""
    records = random_records(2)
    records[0].attributes = np.array([1.0, np.nan, 0.0], np.float32)
    batch = _batch(records)
    assert batch["attributes_mask"].tolist() == [[True, False, True], [True, True, True]]
    assert torch.isfinite(batch["attributes"]).all()
    logits = torch.zeros(2, 3, requires_grad=True)
    loss = attribute_loss(logits, batch["attributes"], batch["attributes_mask"])
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, 1] == 0 and (grad[0, [0, 2]] != 0).all() and (grad[1] != 0).all()
    # the mean over the labelled pairs: the NaN pair neither counts nor dilutes
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.zeros(5), torch.tensor([1.0, 0.0, *batch["attributes"][1].tolist()])
    )
    assert loss.item() == pytest.approx(expected.item())
