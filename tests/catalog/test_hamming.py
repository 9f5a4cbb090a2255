"""Coarse-stage internals: the tie-aware shell rules against the numpy reference, and the in-memory index's
change-log replay when transactions commit out of order (real PostgreSQL, two real connections)."""

import time

import numpy as np
import pytest

from catalog import hamming
from catalog.hamming import memory
from catalog.hamming.candidates import CandidateDepth, ProductFilter, shell_cut
from tests import factories
from tests.catalog import searchkit
from tests.catalog.other_transaction import OtherTransaction
from tests.waiting import wait_until
from workers.ml.codes import select_shells


@pytest.mark.parametrize("seed", range(40))
def test_histogram_shells_match_the_reference_selection(seed):
    rng = np.random.default_rng(seed)
    code_bits = int(rng.choice([8, 16, 32]))
    distances = rng.binomial(code_bits, rng.uniform(0.2, 0.5), int(rng.integers(1, 400))).astype(np.int32)
    min_count = int(rng.integers(1, 60))
    depth = CandidateDepth(
        min_count=min_count,
        max_count=min_count + int(rng.integers(0, 80)),
        radius=None if seed % 3 else int(rng.integers(0, code_bits)),
    )

    rows, radius = memory._shells_from_histogram(distances, code_bits=code_bits, depth=depth)
    reference = select_shells(distances, min_count=depth.min_count, max_count=depth.max_count, radius=depth.radius)

    assert len(rows) == len(reference.indices) and radius == reference.radius
    if len(rows) and len(set(distances[rows])) > 1 or len(rows) == (distances <= radius).sum():
        assert set(rows.tolist()) == set(reference.indices.tolist())  # (a truncated lone shell may differ in members)

    sorted_distances = np.sort(distances)
    assert shell_cut(sorted_distances=sorted_distances, depth=depth, complete=True) == len(reference.indices)


def test_a_list_cut_inside_a_shell_drops_that_shell():
    depth = CandidateDepth(min_count=3, max_count=10)
    # 0, 1, 1 | 2, 2 (the LIMIT cut here: more 2s may exist)
    assert shell_cut(sorted_distances=np.array([0, 1, 1, 2, 2]), depth=depth, complete=False) == 3
    # only part of the first shell came back: something beats nothing
    assert shell_cut(sorted_distances=np.array([4, 4, 4]), depth=depth, complete=False) == 3


def test_depth_rejects_nonsense():
    with pytest.raises(ValueError):
        CandidateDepth(min_count=5, max_count=4)


def _search_ids(version, bits) -> set[int]:
    found = hamming.MEMORY_INDEX.candidates(
        version_id=version.pk,
        code_bits=version.code_bits,
        code=np.packbits(bits),
        depth=CandidateDepth(min_count=1000, max_count=1000),
        product_filter=ProductFilter(),
    )
    return set(found.embedding_ids.tolist())


@pytest.mark.django_db(transaction=True)
def test_a_change_committed_after_a_later_one_is_still_applied():
    """Change ids are taken at insert and become visible at commit: a reader that only followed the highest id seen
    would lose the slower transaction's change for ever."""
    version = searchkit.active_version()
    merchant = factories.merchant()
    rng = np.random.default_rng(0)
    bits = searchkit.random_bits(rng)
    searchkit.random_catalog(merchant=merchant, version=version, count=5)
    hamming.MEMORY_INDEX.refresh(version_id=version.pk, code_bits=version.code_bits)
    loads = hamming.MEMORY_INDEX.stats().full_loads

    def slow_write() -> int:
        planted = searchkit.product_with_embeddings(
            merchant=merchant, version=version, sku="SLOW", encodings=[(bits, np.ones(searchkit.FC7_DIM))]
        )
        return planted.embeddings[0].pk

    with OtherTransaction(slow_write) as slow:
        fast = searchkit.product_with_embeddings(
            merchant=merchant, version=version, sku="FAST", encodings=[(bits, np.ones(searchkit.FC7_DIM))]
        )  # commits now, with a higher change id than the slow one
        time.sleep(memory.CHANGE_POLL_INTERVAL_S)
        seen = _search_ids(version, bits)
        assert fast.embeddings[0].pk in seen and slow.result not in seen

    wait_until(
        lambda: slow.result in _search_ids(version, bits), timeout=1.0, interval=0.02,
        message="the late commit was not applied within 1 s",
    )  # fmt: skip
    assert hamming.MEMORY_INDEX.stats().full_loads == loads  # followed the log; never reloaded
