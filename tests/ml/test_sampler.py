from collections import Counter

import numpy as np
import torch

from workers.ml.datasets import RecordDataset, RenderedProducts, pk_loader
from workers.ml.datasets.render import LABEL_SPACE
from workers.ml.preprocess import Preprocessing
from workers.ml.sampler import CLEAN_VIEW, PKBatchSampler, SampleKey

PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
# 10 instances: instance i has (i % 3) + 1 images.
INSTANCE_IDS = [i for i in range(10) for _ in range(i % 3 + 1)]


def test_batches_hold_p_instances_with_k_views_each():
    sampler = PKBatchSampler(INSTANCE_IDS, p=4, k=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10 // 4
    for batch in batches:
        assert len(batch) == 12 and all(isinstance(key, SampleKey) for key in batch)
        per_instance = Counter(INSTANCE_IDS[key.record] for key in batch)
        assert len(per_instance) == 4 and set(per_instance.values()) == {3}
        for start in range(0, 12, 3):
            group = batch[start : start + 3]
            instance = INSTANCE_IDS[group[0].record]
            available = INSTANCE_IDS.count(instance)
            # Distinct images first; only instances with fewer than K images repeat.
            assert len({key.record for key in group}) == min(available, 3)
            assert group[0].view_seed == CLEAN_VIEW and all(key.view_seed >= 0 for key in group[1:])


def test_sampler_is_deterministic_per_seed_and_epoch():
    a, b = PKBatchSampler(INSTANCE_IDS, 4, 3, seed=5), PKBatchSampler(INSTANCE_IDS, 4, 3, seed=5)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b
    assert list(a) != first_a  # the next epoch is a different one
    a.set_epoch(0)
    assert list(a) == first_a
    assert list(PKBatchSampler(INSTANCE_IDS, 4, 3, seed=6)) != first_a


def test_more_batches_than_one_pass():
    batches = list(PKBatchSampler(INSTANCE_IDS, 4, 2, batches_per_epoch=7))
    assert len(batches) == 7 and all(len(b) == 8 for b in batches)


def test_pk_loader_collates_augmented_views():
    dataset = RecordDataset(RenderedProducts(6, size=48), PREP, augment="mild", seed=0)
    loader = pk_loader(dataset, LABEL_SPACE, p=3, k=2, seed=0)
    batches = list(loader)
    assert len(batches) == 2
    batch = batches[0]
    assert batch["image"].shape == (6, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["landmarks"].shape == (6, 8, 2) and bool(batch["landmarks_mask"].all())
    instances = batch["instance"].tolist()
    assert instances[0] == instances[1] and instances[2] == instances[3]
    # The clean view and the shopper view of one product differ.
    assert not torch.equal(batch["image"][0], batch["image"][1])
    again = next(iter(pk_loader(dataset, LABEL_SPACE, p=3, k=2, seed=0)))
    assert torch.equal(again["image"], batch["image"])


def test_plain_int_index_is_augmented_deterministically():
    dataset = RecordDataset(RenderedProducts(2, size=48), PREP, augment="query", seed=3)
    assert torch.equal(dataset[1][0], dataset[1][0])
    clean = RecordDataset(RenderedProducts(2, size=48), PREP)
    assert not torch.equal(clean[1][0], dataset[1][0])
    assert np.array_equal(dataset.instance_ids, [0, 1])
