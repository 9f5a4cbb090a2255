"""Records -> (tensor, Record) pairs for torch: preprocessing, optional shopper-view augmentation, loaders.

`Preprocess` is the one description of how an image becomes the network's input (stored in checkpoints):
resize to `size` x `size` (aspect not kept, so normalised landmarks stay valid), scale to [0, 1], normalise
with `mean`/`std`. `RecordDataset` applies it, after an optional augmentation seeded per sample, and is
indexed either by a plain int or by a `SampleKey` from the P x K sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from workers.ml.augment import AugmentStrength, as_strength, shopper_view
from workers.ml.records import LabelSpace, Record, collate
from workers.ml.sampler import CLEAN_VIEW, PKBatchSampler, SampleKey

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the pretrained backbones were trained with these
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Image -> input tensor: square resize, [0, 1], per-channel normalisation."""

    size: int = 128
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return preprocess_image(image, self)

    def to_dict(self) -> dict:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        return cls(int(data["size"]), tuple(data["mean"]), tuple(data["std"]))  # type: ignore[arg-type]


def preprocess_image(image: Image.Image, preprocess: Preprocess) -> torch.Tensor:
    """(3, size, size) float32 tensor."""
    resized = image.convert("RGB").resize((preprocess.size, preprocess.size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    return (pixels - mean) / std


def instance_ids(records: Sequence[Record]) -> np.ndarray:
    """Instance id of every index; uses the dataset's cheap `instance_ids` when it has one (no image loads)."""
    cheap = getattr(records, "instance_ids", None)
    if cheap is not None:
        return np.asarray(cheap)
    return np.array([record.instance_id for record in records])


class RecordDataset(Dataset):
    """(preprocessed tensor, possibly augmented Record) for each record of `records`.

    Augmentation (`augment`, a strength or its name) is seeded per sample, so runs repeat exactly:
    an int index uses seed (seed, index); a `SampleKey` uses (seed, view_seed), and `CLEAN_VIEW` means none.
    """

    def __init__(
        self,
        records: Sequence[Record],
        preprocess: Preprocess,
        augment: AugmentStrength | str | None = None,
        seed: int = 0,
    ) -> None:
        self.records = records
        self.preprocess = preprocess
        self.augment = as_strength(augment) if augment is not None else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, Record]:  # type: ignore[override]
        if isinstance(key, tuple):
            index, view_seed = key
            rng_seed = None if view_seed == CLEAN_VIEW else [self.seed, view_seed]
        else:
            index, rng_seed = int(key), [self.seed, int(key)]
        record = self.records[index]
        if self.augment is not None and rng_seed is not None:
            record = shopper_view(record, np.random.default_rng(rng_seed), self.augment)
        return self.preprocess(record.image), record

    @property
    def instance_ids(self) -> np.ndarray:
        return instance_ids(self.records)


def pk_loader(
    dataset: RecordDataset,
    label_space: LabelSpace,
    p: int,
    k: int,
    seed: int = 0,
    num_workers: int = 0,
    clean_views: int = 1,
    batches_per_epoch: int | None = None,
) -> DataLoader:
    """A DataLoader of P x K batches collated by `records.collate` (dicts of tensors with label masks)."""
    sampler = PKBatchSampler(
        dataset.instance_ids, p, k, seed=seed, clean_views=clean_views, batches_per_epoch=batches_per_epoch
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=partial(collate, label_space=label_space),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )


def plain_loader(dataset: RecordDataset, label_space: LabelSpace, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A DataLoader in index order (evaluation, encoding a catalog)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=partial(collate, label_space=label_space),
        num_workers=num_workers,
    )
