"""Multi-task losses, each masked where its label is missing.

A batch may mix merchant-catalog images (category/attributes, no landmarks), Fashion-MNIST (category only) and
rendered images (everything). Every loss here averages only over the samples that carry its label and returns an
exact zero, connected to the graph, when none do, so a missing label never produces NaN or a fake gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workers.ml.model import FashionNetOutput

TRIPLET_MARGIN = 0.2  # on unit vectors (distances in [0, 2]); the usual choice for normalised embeddings
CONTRASTIVE_MARGIN = 0.5  # negatives closer than this are pushed away
INFONCE_TEMPERATURE = 0.1  # SimCLR/SupCon's usual value for unit vectors: sharp enough to mine hard negatives
ATTRIBUTE_MAX_POS_WEIGHT = 20.0  # rare attributes get up-weighted, but not so much that they swamp the rest


@dataclass
class LossWeights:
    """Relative weight of each loss term; 0 switches a term off."""

    landmarks: float = 1.0
    visibility: float = 0.2
    category: float = 0.5
    attributes: float = 0.5
    triplet: float = 1.0
    contrastive: float = 0.0
    infonce: float = 0.0  # softmax over every other image in the batch: stronger signal per step than triplet
    hash_triplet: float = 1.0
    hash_infonce: float = 0.0
    hash_quantization: float = 0.1
    hash_balance: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LossWeights:
        return cls(**{key: float(value) for key, value in data.items()})


def _zero(like: torch.Tensor) -> torch.Tensor:
    """An exact 0 that is still part of the graph (so backward works on an all-masked batch)."""
    return like.sum() * 0.0


def landmark_loss(
    predicted: torch.Tensor, target: torch.Tensor, visibility: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Smooth-L1 on x/y of visible landmarks of samples that have landmarks. predicted/target (N, K, 2)."""
    weight = visibility * mask.unsqueeze(1).to(visibility.dtype)  # (N, K)
    if weight.sum() == 0:
        return _zero(predicted)
    # beta is small because coordinates live in [0, 1]: a 0.02 error should already be linear.
    per_point = F.smooth_l1_loss(predicted, target, reduction="none", beta=0.02).sum(dim=2)
    return (per_point * weight).sum() / weight.sum()


def visibility_loss(logits: torch.Tensor, visibility: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not mask.any():
        return _zero(logits)
    return F.binary_cross_entropy_with_logits(logits[mask], visibility[mask])


def category_loss(logits: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
    known = category >= 0
    if not known.any():
        return _zero(logits)
    return F.cross_entropy(logits[known], category[known])


def attribute_pos_weight(frequency: torch.Tensor) -> torch.Tensor:
    """pos_weight = negatives / positives per attribute, from label frequencies in [0, 1], clamped."""
    frequency = frequency.clamp(1e-4, 1 - 1e-4)
    return ((1 - frequency) / frequency).clamp(1.0, ATTRIBUTE_MAX_POS_WEIGHT)


def attribute_loss(
    logits: torch.Tensor, attributes: torch.Tensor, mask: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted BCE averaged over the labelled (sample, attribute) pairs. `mask` is (N, A), or (N,) for "all of
    this sample's attributes are labelled"."""
    if mask.dim() == 1:
        mask = mask.unsqueeze(1).expand_as(logits)
    if not mask.any():
        return _zero(logits)
    per_label = F.binary_cross_entropy_with_logits(logits, attributes, pos_weight=pos_weight, reduction="none")
    return per_label[mask].mean()


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    squared = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(dim=2)
    return squared.clamp(min=1e-12).sqrt()


def _positive_negative_masks(instance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    known = instance >= 0
    same = instance.unsqueeze(0) == instance.unsqueeze(1)
    both_known = known.unsqueeze(0) & known.unsqueeze(1)
    eye = torch.eye(len(instance), dtype=torch.bool, device=instance.device)
    positive = same & both_known & ~eye
    negative = ~same & both_known
    return known, positive, negative


def batch_hard_triplet_loss(
    embeddings: torch.Tensor, instance: torch.Tensor, margin: float = TRIPLET_MARGIN
) -> torch.Tensor:
    """Hermans et al.: for each anchor, the farthest positive against the closest negative (instance ids)."""
    known, positive, negative = _positive_negative_masks(instance)
    anchors = known & positive.any(dim=1) & negative.any(dim=1)
    if not anchors.any():
        return _zero(embeddings)
    distances = _pairwise_distances(embeddings)
    hardest_positive = (distances * positive).amax(dim=1)
    hardest_negative = distances.masked_fill(~negative, float("inf")).amin(dim=1)
    return F.relu(hardest_positive - hardest_negative + margin)[anchors].mean()


def contrastive_loss(
    embeddings: torch.Tensor, instance: torch.Tensor, margin: float = CONTRASTIVE_MARGIN
) -> torch.Tensor:
    """Hadsell et al.: pull positive pairs together, push negatives beyond `margin`."""
    _, positive, negative = _positive_negative_masks(instance)
    if not (positive.any() or negative.any()):
        return _zero(embeddings)
    distances = _pairwise_distances(embeddings)
    pulled = distances.pow(2)[positive]
    pushed = F.relu(margin - distances).pow(2)[negative]
    return torch.cat([pulled, pushed]).mean()


def infonce_loss(
    embeddings: torch.Tensor, instance: torch.Tensor, temperature: float = INFONCE_TEMPERATURE
) -> torch.Tensor:
    """Multi-positive InfoNCE (SupCon, Khosla et al.) on instance ids: each anchor against all other images."""
    known, positive, _ = _positive_negative_masks(instance)
    anchors = known & positive.any(dim=1)
    if not anchors.any():
        return _zero(embeddings)
    eye = torch.eye(len(instance), dtype=torch.bool, device=instance.device)
    logits = (embeddings @ embeddings.T / temperature).masked_fill(eye | ~known.unsqueeze(0), float("-inf"))
    log_probs = logits.log_softmax(dim=1).masked_fill(~positive, 0.0)
    per_anchor = -log_probs.sum(dim=1) / positive.sum(dim=1).clamp(min=1)
    return per_anchor[anchors].mean()


def hash_relaxation(hash_probs: torch.Tensor) -> torch.Tensor:
    """Activations in (0, 1) mapped to (-1, 1) and scaled so distances compare with unit vectors'."""
    return (2 * hash_probs - 1) / hash_probs.shape[1] ** 0.5


def hash_quantization_loss(hash_probs: torch.Tensor) -> torch.Tensor:
    """Push each activation toward 0 or 1 (mean of (a - 0.5)^2 is at most 0.25): 0.25 - mean((a - .5)^2)."""
    return 0.25 - (hash_probs - 0.5).pow(2).mean()


def hash_balance_loss(hash_probs: torch.Tensor) -> torch.Tensor:
    """Each bit should be on for half the images: squared distance of its batch mean from 0.5."""
    if hash_probs.shape[0] < 2:
        return _zero(hash_probs)
    return (hash_probs.mean(dim=0) - 0.5).pow(2).mean()


class MultiTaskLoss(nn.Module):
    """Weighted sum of every applicable term; `forward` returns the total and the (unweighted) parts."""

    def __init__(self, weights: LossWeights | None = None, attribute_frequency: torch.Tensor | None = None):
        super().__init__()
        self.weights = weights or LossWeights()
        pos_weight = attribute_pos_weight(attribute_frequency) if attribute_frequency is not None else None
        self.attribute_pos_weight: torch.Tensor | None
        self.register_buffer("attribute_pos_weight", pos_weight, persistent=False)

    def forward(self, output: FashionNetOutput, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        w = self.weights
        parts: dict[str, torch.Tensor] = {}
        instance = batch["instance"]
        if "metric" in batch:  # images outside the metric space are neither anchors, positives nor negatives
            instance = instance.masked_fill(~batch["metric"], -1)
        if output.landmarks is not None and output.visibility_logits is not None:
            mask = batch["landmarks_mask"]
            if w.landmarks:
                parts["landmarks"] = landmark_loss(output.landmarks, batch["landmarks"], batch["visibility"], mask)
            if w.visibility:
                parts["visibility"] = visibility_loss(output.visibility_logits, batch["visibility"], mask)
        if output.category_logits is not None and w.category:
            parts["category"] = category_loss(output.category_logits, batch["category"])
        if output.attribute_logits is not None and w.attributes:
            parts["attributes"] = attribute_loss(
                output.attribute_logits, batch["attributes"], batch["attributes_mask"], self.attribute_pos_weight
            )
        if w.triplet:
            parts["triplet"] = batch_hard_triplet_loss(output.embedding, instance)
        if w.contrastive:
            parts["contrastive"] = contrastive_loss(output.embedding, instance)
        if w.infonce:
            parts["infonce"] = infonce_loss(output.embedding, instance)
        if w.hash_infonce:
            # On the (-1, 1) relaxation normalised to the unit sphere: cosine = 1 - 2 * hamming / B for binary codes.
            relaxed = F.normalize(2 * output.hash_probs - 1, dim=1)
            parts["hash_infonce"] = infonce_loss(relaxed, instance)
        if w.hash_triplet:
            parts["hash_triplet"] = batch_hard_triplet_loss(hash_relaxation(output.hash_probs), instance)
        if w.hash_quantization:
            parts["hash_quantization"] = hash_quantization_loss(output.hash_probs)
        if w.hash_balance:
            parts["hash_balance"] = hash_balance_loss(output.hash_probs)
        total = sum((getattr(w, name) * value for name, value in parts.items()), _zero(output.fc7))
        return total, parts
