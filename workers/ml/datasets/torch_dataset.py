"""Records -> (tensor, Record) pairs for torch: preprocessing, optional shopper-view augmentation, loaders.

Preprocessing is the project's one convention, `workers.ml.preprocess` (letterbox to a square input, the
settings stored in checkpoints); landmark targets move into the input square's coordinates with it.
`RecordDataset` applies it after an optional augmentation seeded per sample, and is indexed either by a plain
int or by a `SampleKey` from the P x K sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from workers.ml.augment import AugmentStrength, as_strength, shopper_view
from workers.ml.preprocess import Preprocessing, preprocess
from workers.ml.records import LabelSpace, Record, collate
from workers.ml.sampler import CLEAN_VIEW, PKBatchSampler, SampleKey


def prepare_record(record: Record, prep: Preprocessing) -> tuple[torch.Tensor, Record]:
    """Letterbox the image into the input tensor; landmarks are re-expressed in the input square."""
    tensor, box = preprocess(record.image, prep)
    if record.landmarks is not None:
        record = replace(record, landmarks=box.to_input(record.landmarks))
    return tensor, record


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
        prep: Preprocessing,
        augment: AugmentStrength | str | None = None,
        seed: int = 0,
    ) -> None:
        self.records = records
        self.prep = prep
        self.augment = as_strength(augment) if augment is not None else None
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, Record]:
        if isinstance(key, tuple):
            index, view_seed = key
            rng_seed = None if view_seed == CLEAN_VIEW else [self.seed, view_seed]
        else:
            index, rng_seed = int(key), [self.seed, int(key)]
        record = self.records[index]
        if self.augment is not None and rng_seed is not None:
            record = shopper_view(record, np.random.default_rng(rng_seed), self.augment)
        return prepare_record(record, self.prep)

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
