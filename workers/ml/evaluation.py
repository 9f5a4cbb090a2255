"""Retrieval and auxiliary-head metrics, usable without Django.

Three retrieval modes over one catalog and one query set (relevant = catalog items with the query's instance
id): (i) exact L2 on fc7, (ii) Hamming distance on the codes alone, (iii) the cascade the product runs —
Hamming shells (tie-aware, see codes.select_shells) then an exact fc7 rerank of those candidates only.

Ties: Hamming distances tie a lot. Recall@k is the *expected* recall under a random order within ties (exact,
hypergeometric), so neither a lucky nor an unlucky tie-break is reported. mAP breaks ties pessimistically
(relevant items last among equals), so it is a lower bound.

Also here: the per-epoch check training runs (`retrieval_validator`) and the issue's untuned-backbone reference
(`untuned_reference`). The command line is `python -m workers.ml.evaluate`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from workers.ml.codes import bit_balance, hamming_distances, pack_bits, select_shells
from workers.ml.records import LabelSpace, Record

RECALL_KS = (1, 5, 10, 20)
CASCADE_MIN_CANDIDATES = 100  # coarse shortlist the fine stage reranks; the product's default order of size
CASCADE_MAX_CANDIDATES = 1000  # matches the search side's cap (rerank stays cheap)
CASCADE_SWEEP = (10, 20, 50)  # smaller shortlists, reported too: how much the coarse stage alone can carry
PCK_THRESHOLD = 0.1  # a landmark counts as found within 10% of the image side


@dataclass(frozen=True)
class RetrievalInputs:
    """What retrieval needs from a set of encoded images."""

    fc7: np.ndarray  # (N, D) float32
    codes: np.ndarray  # (N, B/8) uint8, packed
    instance: np.ndarray  # (N,) int64 product identity


def _expected_hit_at_k(n_better: np.ndarray, n_tied_irrelevant: np.ndarray, n_tied_relevant: np.ndarray, k: int):
    """P(some relevant item in the top k) when the best relevant distance ties with other items.

    n_better irrelevant items are strictly closer; then a tie group of n_tied_irrelevant + n_tied_relevant items
    in random order. We need one of the first s = k - n_better slots of the group to be relevant:
    1 - C(irr, s) / C(irr + rel, s).
    """
    out = np.zeros(len(n_better))
    for i, (better, irr, rel) in enumerate(zip(n_better, n_tied_irrelevant, n_tied_relevant)):
        if rel == 0:
            continue
        slots = k - better
        if slots <= 0:
            continue
        if slots > irr:
            out[i] = 1.0
            continue
        miss = 1.0
        for j in range(slots):  # C(irr, s)/C(irr+rel, s) = prod_j (irr - j) / (irr + rel - j)
            miss *= (irr - j) / (irr + rel - j)
        out[i] = 1.0 - miss
    return out


def ranking_metrics(distances: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict:
    """Recall@k (expected under random tie order) and mAP (ties pessimistic) from (Q, N) distances.

    Items at distance +inf are "not returned" (a cascade's non-candidates): they never count as hits.
    """
    distances = np.asarray(distances, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    finite = np.isfinite(distances)
    best = np.where(relevant & finite, distances, np.inf).min(axis=1, keepdims=True)
    irrelevant = ~relevant & finite
    n_better = (irrelevant & (distances < best)).sum(axis=1)
    n_tied_irr = (irrelevant & (distances == best)).sum(axis=1)
    n_tied_rel = (relevant & finite & (distances == best)).sum(axis=1)
    metrics = {f"R@{k}": float(_expected_hit_at_k(n_better, n_tied_irr, n_tied_rel, k).mean()) for k in ks}

    # Pessimistic ties: sort by distance, irrelevant before relevant on equal distance.
    order = np.lexsort((relevant, distances), axis=1)
    ranked_relevant = np.take_along_axis(relevant & finite, order, axis=1)
    hits = np.cumsum(ranked_relevant, axis=1)
    ranks = np.arange(1, distances.shape[1] + 1)
    precision_at_hits = np.where(ranked_relevant, hits / ranks, 0.0)
    total_relevant = relevant.sum(axis=1)
    ap = precision_at_hits.sum(axis=1) / np.maximum(total_relevant, 1)
    metrics["mAP"] = float(ap[total_relevant > 0].mean()) if (total_relevant > 0).any() else 0.0
    return metrics


def _l2(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    q = queries.astype(np.float64)
    db = database.astype(np.float64)
    squared = (q * q).sum(1)[:, None] + (db * db).sum(1)[None, :] - 2 * q @ db.T
    return np.sqrt(np.maximum(squared, 0.0))


def retrieval_report(
    queries: RetrievalInputs,
    catalog: RetrievalInputs,
    *,
    ks: Sequence[int] = RECALL_KS,
    cascade_min: int = CASCADE_MIN_CANDIDATES,
    cascade_max: int = CASCADE_MAX_CANDIDATES,
    cascade_radius: int | None = None,
) -> dict:
    """fc7-exact, Hamming-only and cascade metrics plus coarse-stage recall and bit balance."""
    relevant = queries.instance[:, None] == catalog.instance[None, :]
    fc7_distances = _l2(queries.fc7, catalog.fc7)
    hamming = hamming_distances(queries.codes, catalog.codes)

    cascade, coarse_recall, mean_candidates = _cascade(
        hamming, fc7_distances, relevant, cascade_min, cascade_max, cascade_radius
    )
    sweep = {}
    for minimum in CASCADE_SWEEP:
        distances, recall, candidates = _cascade(hamming, fc7_distances, relevant, minimum, cascade_max, None)
        sweep[str(minimum)] = {
            "R@1": ranking_metrics(distances, relevant, (1,))["R@1"],
            "coarse_recall": recall,
            "mean_candidates": candidates,
        }

    code_bits = catalog.codes.shape[1] * 8
    all_bits = np.unpackbits(np.concatenate([catalog.codes, queries.codes]), axis=1)[:, :code_bits]
    return {
        "num_queries": int(len(queries.instance)),
        "num_catalog": int(len(catalog.instance)),
        "code_bits": int(code_bits),
        "fc7_dim": int(catalog.fc7.shape[1]),
        "fc7": ranking_metrics(fc7_distances, relevant, ks),
        "hamming": ranking_metrics(hamming, relevant, ks),
        "cascade": {
            **ranking_metrics(cascade, relevant, ks),
            "coarse_recall": coarse_recall,
            "mean_candidates": mean_candidates,
            "min_count": cascade_min,
            "max_count": cascade_max,
            "radius": cascade_radius,
        },
        "cascade_sweep": sweep,
        "bit_balance": bit_balance(all_bits),
    }


def _cascade(
    hamming: np.ndarray,
    fc7_distances: np.ndarray,
    relevant: np.ndarray,
    minimum: int,
    maximum: int | None,
    radius: int | None,
) -> tuple[np.ndarray, float, float]:
    """fc7 distances kept only for each query's Hamming shortlist (+inf elsewhere), coarse recall, mean size."""
    cascade = np.full_like(fc7_distances, np.inf)
    counts, hits = [], []
    for i in range(len(hamming)):
        shells = select_shells(hamming[i], min_count=minimum, max_count=maximum, radius=radius)
        cascade[i, shells.indices] = fc7_distances[i, shells.indices]
        counts.append(len(shells.indices))
        hits.append(bool(relevant[i, shells.indices].any()))
    return cascade, float(np.mean(hits)), float(np.mean(counts))


def landmark_pck(
    predicted: np.ndarray,
    target: np.ndarray,
    visibility: np.ndarray,
    threshold: float = PCK_THRESHOLD,
    scale: np.ndarray | None = None,
) -> float:
    """Fraction of visible landmarks predicted within `threshold` x `scale` (normalised image coordinates):
    predicted/target (N, K, 2), visibility (N, K); `scale` (N,) per image, e.g. its item box's diagonal, or 1
    (the image side)."""
    visible = np.asarray(visibility) > 0.5
    if not visible.any():
        return float("nan")
    error = np.linalg.norm(np.asarray(predicted) - np.asarray(target), axis=-1)
    if scale is not None:
        error = error / np.asarray(scale, np.float64).reshape(-1, *([1] * (error.ndim - 1)))
    return float((error[visible] <= threshold).mean())


def landmark_report(encoder, records: Sequence[Record], *, threshold: float = PCK_THRESHOLD) -> dict | None:
    """PCK@threshold of the item box's diagonal (the usual normalisation: a landmark's tolerance grows with the
    item, not the photo) on Records with landmarks and a normalised box in extra["bbox"]; None when the encoder's
    network has no landmark head of that layout."""
    targets = [r.landmarks for r in records if r.landmarks is not None]
    visibilities = [r.visibility for r in records if r.visibility is not None]
    if not records or len(targets) != len(records) or len(visibilities) != len(records):
        raise ValueError("landmark_report needs records with landmarks and visibility")
    if encoder.label_space.num_landmarks != len(targets[0]):
        return None
    encoding = encoder.encode([r.image for r in records])
    if encoding.landmarks is None:
        return None
    visibility = np.stack(visibilities)
    boxes = np.array([r.extra["bbox"] for r in records], np.float64)
    diagonal = np.hypot(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return {
        "pck": landmark_pck(encoding.landmarks, np.stack(targets), visibility, threshold, scale=diagonal),
        "threshold": threshold,
        "normalised_by": "item box diagonal",
        "images": len(records),
        "landmarks": int((visibility > 0.5).sum()),
    }


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(-scores, kind="stable")
    labels = np.asarray(labels, dtype=bool)[order]
    if not labels.any():
        return float("nan")
    hits = np.cumsum(labels)
    return float((hits / np.arange(1, len(labels) + 1))[labels].mean())


def attribute_metrics(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy at 0.5 and mean AP over attributes that have at least one positive."""
    probs = np.asarray(probs)
    labels = np.asarray(labels) > 0.5
    aps = [average_precision(probs[:, j], labels[:, j]) for j in range(labels.shape[1])]
    aps = [ap for ap in aps if not math.isnan(ap)]
    return {
        "accuracy": float(((probs > 0.5) == labels).mean()),
        "mAP": float(np.mean(aps)) if aps else float("nan"),
    }


def category_accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels)
    known = labels >= 0
    if not known.any():
        return float("nan")
    return float((np.asarray(probs)[known].argmax(axis=1) == labels[known]).mean())


# ---------------------------------------------------------------------------------------------- encoders


def evaluate_encoder(encoder, catalog: Sequence, queries: Sequence, *, batch_size: int = 128, **cascade) -> dict:
    """Encode catalog and query Records with an `Encoder` and compute every metric their labels allow."""
    started = time.perf_counter()
    catalog_encoding = encoder.encode([r.image for r in catalog], batch_size=batch_size)
    query_encoding = encoder.encode([r.image for r in queries], batch_size=batch_size)
    seconds = time.perf_counter() - started
    report = retrieval_report(
        RetrievalInputs(query_encoding.fc7, query_encoding.codes, np.array([r.instance_id for r in queries], np.int64)),
        RetrievalInputs(
            catalog_encoding.fc7, catalog_encoding.codes, np.array([r.instance_id for r in catalog], np.int64)
        ),
        **cascade,
    )
    report["encode_images_per_second"] = (len(catalog) + len(queries)) / max(seconds, 1e-9)
    report.update(_head_metrics(query_encoding, queries))
    report["version"] = encoder.version_info
    return report


def _head_metrics(encoding, records: Sequence) -> dict:
    out: dict = {}
    if encoding.category_probs is not None:
        categories = np.array([r.category for r in records])
        out["category_accuracy"] = category_accuracy(encoding.category_probs, categories)
    if encoding.landmarks is not None:
        with_landmarks = [i for i, r in enumerate(records) if r.landmarks is not None]
        if with_landmarks:
            out["landmark_pck@0.1"] = landmark_pck(
                encoding.landmarks[with_landmarks],
                np.stack([records[i].landmarks for i in with_landmarks]),
                np.stack(
                    [
                        records[i].visibility
                        if records[i].visibility is not None
                        else np.ones(len(records[i].landmarks))
                        for i in with_landmarks
                    ]
                ),
            )
    if encoding.attribute_probs is not None:
        with_attributes = [i for i, r in enumerate(records) if r.attributes is not None]
        if with_attributes:
            out["attributes"] = attribute_metrics(
                encoding.attribute_probs[with_attributes], np.stack([records[i].attributes for i in with_attributes])
            )
    return out


def head_metrics(encoder, records: Sequence, *, batch_size: int = 128) -> dict:
    """Category accuracy, landmark PCK@0.1 and attribute metrics on labelled Records."""
    return _head_metrics(encoder.encode([r.image for r in records], batch_size=batch_size), records)


def retrieval_validator(catalog: Sequence[Record], queries: Sequence[Record], label_space: LabelSpace) -> Callable:
    """Per-epoch check for training: R@1 of the three modes and head metrics on held-out training-side data."""

    def validate(model, prep) -> dict:
        from workers.ml.encoder import Encoder

        encoder = Encoder.from_model(model, label_space=label_space, preprocessing=prep)
        report = evaluate_encoder(encoder, catalog, queries)
        summary = {mode: round(report[mode]["R@1"], 4) for mode in ("fc7", "hamming", "cascade")}
        summary["bit_balance"] = round(report["bit_balance"]["balance"], 4)
        for key in ("category_accuracy", "landmark_pck@0.1"):
            if key in report:
                summary[key] = round(report[key], 4)
        return summary

    return validate


# ---------------------------------------------------------------------------------------------- reference


REFERENCE_INPUT_SIZE = 224  # the backbone's own ImageNet resolution: the "untuned" setting, no choices of ours
REFERENCE_POOLING = "gap"  # the reference: the backbone as timm pools it
REFERENCE_HASH_BITS = 64


def untuned_reference(
    catalog: Sequence[Record], queries_by_strength: dict[str, Sequence[Record]], *, seed: int = 0
) -> dict[str, dict]:
    """The issue's reference measurement on each query set: how hard are these queries for an untuned network?

    The packaged ImageNet backbone, globally pooled and L2-normalised, compared (i) as float vectors with exact
    L2 ("fc7-style float") and (ii) as 64-bit signs of seeded Gaussian projections of the features centred on
    the catalog mean (uncentred, the all-positive pooled features would waste most bits), Hamming distance.
    The issue's figures on its queries: 0.664 and 0.281 R@1. Lower numbers here mean harder queries. The query
    sets share the one catalog, whose features are extracted once.
    """
    import torch

    from workers.ml.backbone import PACKAGED_BACKBONE, PACKAGED_MEAN, PACKAGED_STD, create_pooled_model
    from workers.ml.baseline import extract_features
    from workers.ml.preprocess import Preprocessing

    model = create_pooled_model(PACKAGED_BACKBONE, packaged_weights=True).eval().to(memory_format=torch.channels_last)
    prep = Preprocessing(REFERENCE_INPUT_SIZE, PACKAGED_MEAN, PACKAGED_STD)
    catalog_features = extract_features(model, [r.image for r in catalog], prep, pooling=REFERENCE_POOLING)
    projection = np.random.default_rng(seed).standard_normal((catalog_features.shape[1], REFERENCE_HASH_BITS))
    centre = catalog_features.mean(axis=0)

    def inputs(features: np.ndarray, records: Sequence[Record]) -> RetrievalInputs:
        codes = pack_bits((features - centre) @ projection > 0)
        return RetrievalInputs(features, codes, np.array([r.instance_id for r in records], np.int64))

    catalog_inputs = inputs(catalog_features, catalog)
    references = {}
    for strength, queries in queries_by_strength.items():
        query_features = extract_features(model, [r.image for r in queries], prep, pooling=REFERENCE_POOLING)
        report = retrieval_report(inputs(query_features, queries), catalog_inputs)
        references[strength] = {
            "input_size": REFERENCE_INPUT_SIZE,
            "float_R@1": report["fc7"]["R@1"],
            f"hash{REFERENCE_HASH_BITS}_R@1": report["hamming"]["R@1"],
        }
    return references
