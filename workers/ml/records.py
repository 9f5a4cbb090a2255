"""The one labelled-image format every dataset yields and every trainer consumes.

Labels are optional one by one: a merchant catalog has category/attributes but no landmarks, Fashion-MNIST has
categories only, the procedural renderer has everything. A missing label is `None` (or -1 for a class index),
and the collated batch carries a mask per label so every loss can ignore what it was not given. Attributes are
also optional one by one: NaN marks an attribute outside the vocabulary its source labels (a shop's catalog mixed
with rendered products, datasets.mixed: a rendered dress says nothing about the shop's own attribute names).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from inference.checkpoint import LabelSpace as LabelSpace  # defined beside the checkpoint format, which stores it

if TYPE_CHECKING:  # torch is imported by `collate` only: the data side (and Django's demo command) runs without it
    import torch


@dataclass
class Record:
    """One image and whatever labels are known for it."""

    image: Image.Image  # RGB
    instance_id: int = -1  # product identity: several images of one product share it; -1 = unknown
    category: int = -1  # index into LabelSpace.categories; -1 = unknown
    attributes: np.ndarray | None = None  # (A,) float32 in {0, 1}; NaN = this attribute is not labelled
    landmarks: np.ndarray | None = None  # (K, 2) float32, x/y normalised to [0, 1] of the image
    visibility: np.ndarray | None = None  # (K,) float32 in {0, 1}
    # False: the metric losses (triplet, hash) leave this image out; its other labels still teach their heads. A
    # rendered product mixed into a shop's retrain (datasets.mixed) is one: it teaches landmarks and attributes,
    # and the shop's metric space stays the shop's.
    metric: bool = True
    extra: dict = field(default_factory=dict)  # free-form provenance (file name, sku, ...)


def collate(samples: Sequence[tuple[torch.Tensor, Record]], label_space: LabelSpace) -> dict[str, torch.Tensor]:
    """Stack (preprocessed image tensor, record) pairs into one batch with a mask per optional label."""
    import torch

    n = len(samples)
    num_attributes = len(label_space.attributes)
    k = label_space.num_landmarks
    batch = {
        "image": torch.stack([image for image, _ in samples]),
        "instance": torch.tensor([r.instance_id for _, r in samples], dtype=torch.long),
        "category": torch.tensor([r.category for _, r in samples], dtype=torch.long),
        "attributes": torch.zeros(n, num_attributes),
        "attributes_mask": torch.zeros(n, num_attributes, dtype=torch.bool),  # per sample and attribute
        "landmarks": torch.zeros(n, k, 2),
        "visibility": torch.zeros(n, k),
        "landmarks_mask": torch.zeros(n, dtype=torch.bool),
        "metric": torch.tensor([r.metric for _, r in samples], dtype=torch.bool),
    }
    for i, (_, record) in enumerate(samples):
        if record.attributes is not None and num_attributes:
            attributes = torch.as_tensor(record.attributes, dtype=torch.float32)
            known = ~torch.isnan(attributes)
            batch["attributes"][i] = torch.where(known, attributes, 0.0)
            batch["attributes_mask"][i] = known
        if record.landmarks is not None and k:
            batch["landmarks"][i] = torch.as_tensor(record.landmarks, dtype=torch.float32)
            visibility = record.visibility if record.visibility is not None else np.ones(k, np.float32)
            batch["visibility"][i] = torch.as_tensor(visibility, dtype=torch.float32)
            batch["landmarks_mask"][i] = True
    return batch
