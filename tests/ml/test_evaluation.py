import numpy as np
import pytest

from workers.ml.codes import pack_bits
from workers.ml.evaluation import (
    RetrievalInputs,
    attribute_metrics,
    category_accuracy,
    landmark_pck,
    ranking_metrics,
    retrieval_report,
)


def _inputs(fc7, bits, instance):
    return RetrievalInputs(np.asarray(fc7, np.float32), pack_bits(np.asarray(bits, bool)), np.asarray(instance))


def test_perfect_embeddings_give_recall_one_and_shuffled_give_less():
    rng = np.random.default_rng(0)
    n = 50
    fc7 = rng.standard_normal((n, 16)).astype(np.float32)
    bits = rng.random((n, 32)) > 0.5
    catalog = _inputs(fc7, bits, np.arange(n))
    perfect = retrieval_report(_inputs(fc7, bits, np.arange(n)), catalog, cascade_min=5, cascade_max=20)
    for mode in ("fc7", "hamming", "cascade"):
        assert perfect[mode]["R@1"] == 1.0 and perfect[mode]["mAP"] == 1.0
    assert perfect["cascade"]["coarse_recall"] == 1.0

    shuffled = rng.permutation(n)
    wrong = retrieval_report(_inputs(fc7[shuffled], bits[shuffled], np.arange(n)), catalog, cascade_min=5)
    assert wrong["fc7"]["R@1"] < 0.2 and wrong["hamming"]["R@1"] < 0.2


def test_hand_computed_ranks():
    distances = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    relevant = np.array([[False, True, False], [True, False, False]])
    metrics = ranking_metrics(distances, relevant, ks=(1, 2, 3))
    # query 0: relevant at rank 2; query 1: relevant at rank 3
    assert metrics["R@1"] == 0.0 and metrics["R@2"] == 0.5 and metrics["R@3"] == 1.0
    assert metrics["mAP"] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_ties_count_as_expected_recall_and_non_candidates_never_hit():
    # relevant item tied with three others at distance 0: expected R@1 = 1/4, R@2 = 1 - (3/4)(2/3) = 1/2
    metrics = ranking_metrics(np.zeros((1, 4)), np.array([[False, True, False, False]]), ks=(1, 2, 4))
    assert metrics["R@1"] == pytest.approx(0.25)
    assert metrics["R@2"] == pytest.approx(0.5)
    assert metrics["R@4"] == pytest.approx(1.0)
    assert metrics["mAP"] == pytest.approx(0.25)  # pessimistic: relevant last among equals
    cut = ranking_metrics(np.array([[0.0, np.inf]]), np.array([[False, True]]), ks=(1, 2))
    assert cut["R@2"] == 0.0 and cut["mAP"] == 0.0


def test_cascade_is_limited_by_its_coarse_stage():
    # Hamming puts the true item far away; fc7 finds it. With a 1-item shortlist the cascade misses it.
    fc7 = np.eye(4, dtype=np.float32)
    catalog_bits = np.zeros((4, 32), bool)
    catalog_bits[0, :16] = True  # item 0 is far in Hamming from the query's all-zero code
    catalog = _inputs(fc7, catalog_bits, [0, 1, 2, 3])
    query = _inputs(fc7[:1], np.zeros((1, 32), bool), [0])
    narrow = retrieval_report(query, catalog, cascade_min=1, cascade_max=1)
    assert narrow["fc7"]["R@1"] == 1.0
    assert narrow["cascade"]["coarse_recall"] == 0.0 and narrow["cascade"]["R@1"] == 0.0
    wide = retrieval_report(query, catalog, cascade_min=4)
    assert wide["cascade"]["R@1"] == 1.0


def test_head_metrics():
    predicted = np.array([[[0.5, 0.5], [0.0, 0.0]], [[0.1, 0.1], [0.9, 0.9]]])
    target = np.array([[[0.55, 0.5], [1.0, 1.0]], [[0.3, 0.1], [0.9, 0.9]]])
    visibility = np.array([[1, 0], [1, 1]])
    assert landmark_pck(predicted, target, visibility) == pytest.approx(2 / 3)
    # normalised per image (its item box's diagonal): the second image's 0.2 error is within 0.1 of a 2.5 diagonal
    assert landmark_pck(predicted, target, visibility, scale=np.array([1.0, 2.5])) == pytest.approx(1.0)
    assert landmark_pck(predicted, target, visibility, scale=np.array([0.25, 1.0])) == pytest.approx(1 / 3)
    assert category_accuracy(np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]]), [0, 0, -1]) == 0.5
    result = attribute_metrics(np.array([[0.9, 0.2], [0.1, 0.7]]), np.array([[1, 0], [0, 1]]))
    assert result["accuracy"] == 1.0 and result["mAP"] == 1.0
