"""P x K batches for metric learning: P distinct product instances, K views of each.

Triplet losses with batch-hard mining need every anchor's positives in the same batch. `PKBatchSampler`
yields lists of `SampleKey(record, view_seed)`: K keys per instance, drawn from the instance's distinct images
(without replacement while there are enough) and topped up with repeats; each key carries its own
augmentation seed, so repeats of one image become different shopper views in `RecordDataset`, and the whole
epoch is a pure function of (seed, epoch). The first `clean_views` keys of each instance have view_seed
`CLEAN_VIEW`: left unaugmented, they play the catalog photo that the other views must match.

Use with a DataLoader as `batch_sampler=PKBatchSampler(...)` and `collate_fn=partial(collate, label_space=...)`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

CLEAN_VIEW = -1  # view_seed meaning "no augmentation"


class SampleKey(NamedTuple):
    """What a P x K batch asks the dataset for: an image index and the seed of its random shopper view."""

    record: int  # dataset index of the image (not `index`: that name is tuple.index)
    view_seed: int


class PKBatchSampler:
    """Batches of `p` instances x `k` views, deterministic from `seed` and the epoch.

    `instance_ids[i]` is the product identity of dataset index i. Each epoch visits the instances in a fresh
    random order, `p` at a time (the last incomplete group is dropped), so an epoch has
    `len(unique instances) // p` batches unless `batches_per_epoch` says otherwise. Call `set_epoch(e)` when
    resuming; otherwise every `iter()` advances the epoch by one.
    """

    def __init__(
        self,
        instance_ids: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        seed: int = 0,
        clean_views: int = 1,
        batches_per_epoch: int | None = None,
    ) -> None:
        ids = np.asarray(instance_ids)
        self.instances, inverse = np.unique(ids, return_inverse=True)
        if len(self.instances) < p:
            raise ValueError(f"need at least p={p} distinct instances, have {len(self.instances)}")
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(self.instances)))[:-1]
        self.indices_of: list[np.ndarray] = np.split(order, bounds)
        self.p, self.k, self.seed = p, k, seed
        self.clean_views = min(clean_views, k)
        self.batches_per_epoch = batches_per_epoch or len(self.instances) // p
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        groups_per_pass = len(self.instances) // self.p
        order = rng.permutation(len(self.instances))
        for batch_number in range(self.batches_per_epoch):
            group = batch_number % groups_per_pass
            if group == 0 and batch_number > 0:
                order = rng.permutation(len(self.instances))  # more batches than one pass: a fresh order
            batch: list[SampleKey] = []
            for instance in order[group * self.p : (group + 1) * self.p]:
                batch += self._views(self.indices_of[instance], rng)
            yield batch

    def _views(self, indices: np.ndarray, rng: np.random.Generator) -> list[SampleKey]:
        if len(indices) >= self.k:
            chosen = rng.choice(indices, self.k, replace=False)
        else:
            # Every distinct image once, the rest repeats (which differ by their augmentation seed).
            chosen = np.concatenate([rng.permutation(indices), rng.choice(indices, self.k - len(indices))])
        seeds = rng.integers(0, 2**31 - 1, self.k)
        return [
            SampleKey(int(index), CLEAN_VIEW if view < self.clean_views else int(view_seed))
            for view, (index, view_seed) in enumerate(zip(chosen, seeds))
        ]
