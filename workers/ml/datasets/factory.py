"""The data-set registry: training data and evaluation sets by name, from a JSON spec {"name": ..., ...}.

    records, label_space, validate = build_dataset({"name": "fashion-mnist", "limit": 5000})
    sets = evaluation_sets("renderer", catalog_size=1000, num_queries=2000)

Training and evaluation never share images. Fashion-MNIST: training sees the `train` split minus a validation
hold-out taken from `train` too; the evaluation catalog is the first N images of `t10k` and its queries are
shopper views (workers.ml.augment, fixed seed) of catalog items. Each t10k image is its own product, so R@1 asks:
among N look-alike product photos, is the one this shopper photo shows ranked first? The renderer's splits are
disjoint seed ranges. DeepFashion (data the user brings, under `root`): the benchmarks' own splits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from workers.ml.augment import shopper_view
from workers.ml.datasets import fashion_mnist, render
from workers.ml.datasets.catalog_export import CatalogExport
from workers.ml.datasets.deepfashion import DeepFashionCategoryAttribute, DeepFashionInShop
from workers.ml.datasets.mixed import MixedRecords
from workers.ml.evaluation import retrieval_validator
from workers.ml.records import LabelSpace, Record

TRAINING_DATASETS = (
    "fashion-mnist",
    "renderer",
    "deepfashion-inshop",
    "deepfashion-category-attribute",
    "catalog-export",
)
EVALUATION_DATASETS = ("fashion-mnist", "renderer", "deepfashion-inshop")
VALIDATION_HOLDOUT = 1000  # train-split images kept out of training to watch retrieval per epoch
VALIDATION_PRODUCTS = 500  # renderer / Category-Attribute products the per-epoch validation looks at
VALIDATION_QUERY_SEED = 12345
EVALUATION_QUERY_SEED = 2024  # fixed: every model version is measured on the same shopper photos
QUERY_STRENGTH = "query"  # the harsher shopper photos; per-epoch validation uses these
RENDER_CACHE_LIMIT = 20000  # renders are pre-drawn once (15 ms each) and kept in memory, ~50 kB apiece
RENDER_VALIDATION_OFFSET = 5_000_000  # validation products: inside the training seed range, past any run's count
LANDMARK_HELDOUT_PRODUCTS = 100  # rendered products whose landmarks a version is measured on: ~1,200 visible points
LANDMARK_HELDOUT_VIEWS = 2  # the canonical studio photo and one in another pose and backdrop


class TrainingData(NamedTuple):
    records: Sequence[Record]
    label_space: LabelSpace
    validate: Callable | None  # validate(model, prep) -> dict, after every epoch; None: no validation data


@dataclass(frozen=True)
class EvaluationSets:
    catalog: list[Record]
    queries: list[Record]
    label_space: LabelSpace


# ---------------------------------------------------------------------------------------------- training


def build_dataset(spec: dict) -> TrainingData:
    """Training records, their label space and a per-epoch validation from a JSON spec {"name": ..., ...}.

    fashion-mnist: the `train` split minus its last `holdout` images (validation); `limit` caps the rest.
    renderer: `products` training products x `views` catalog photos each; validation products come from a
    seed range neither training nor evaluation uses.
    deepfashion-inshop / deepfashion-category-attribute: the benchmark's "train" split under `root` (the data
    is the user's: it cannot be downloaded here); `crop_to_bbox` for In-shop; Category-Attribute validates
    on its "val" split.
    catalog-export: a shop's exported catalog in `directory` (what the admin's retraining trains on), every
    photo of a product one view of it; no validation. `mix_rendered` (0 when absent: the export alone) is the
    share of the training products that are rendered ones mixed in (datasets.mixed), `rendered_views` catalog
    photos each: they carry the landmarks, visibility and attributes a shop's catalog lacks; the metric losses
    leave them out unless `rendered_metric`.
    """
    name = spec["name"]
    if name == "fashion-mnist":
        records = fashion_mnist.load_records("train")
        holdout = int(spec.get("holdout", VALIDATION_HOLDOUT))
        stop = len(records) - holdout
        if spec.get("limit"):
            stop = min(stop, int(spec["limit"]))
        validation = [records[i] for i in range(len(records) - holdout, len(records))]
        validate = _validator(validation, fashion_mnist.LABEL_SPACE) if holdout else None
        return TrainingData(Slice(records, 0, stop), fashion_mnist.LABEL_SPACE, validate)
    if name == "renderer":
        products = PreRendered(render.RenderedProducts(int(spec.get("products", 3000)), int(spec.get("views", 2))))
        first_validation_seed = render.TRAIN_FIRST_SEED + RENDER_VALIDATION_OFFSET
        validation = [render.render_product(first_validation_seed + i, 0) for i in range(VALIDATION_PRODUCTS)]
        return TrainingData(products, render.LABEL_SPACE, _validator(validation, render.LABEL_SPACE))
    if name == "deepfashion-inshop":
        # The label space comes from the whole benchmark, so evaluation's gallery/query splits share it.
        root = _data_root(name, spec.get("root"))
        label_space = DeepFashionInShop(root, None).label_space
        crop = bool(spec.get("crop_to_bbox"))
        train_split = DeepFashionInShop(root, "train", crop_to_bbox=crop, label_space=label_space)
        return TrainingData(train_split, label_space, None)
    if name == "deepfashion-category-attribute":
        root = _data_root(name, spec.get("root"))
        attribute_train = DeepFashionCategoryAttribute(root, "train")
        validation_split = DeepFashionCategoryAttribute(root, "val", label_space=attribute_train.label_space)
        validation = [validation_split[i] for i in range(min(VALIDATION_PRODUCTS, len(validation_split)))]
        validate = _validator(validation, attribute_train.label_space) if validation else None
        return TrainingData(attribute_train, attribute_train.label_space, validate)
    if name == "catalog-export":
        if not spec.get("directory"):
            raise ValueError("catalog-export needs the export's folder (dataset.directory)")
        export = CatalogExport(spec["directory"])
        share = float(spec.get("mix_rendered", 0.0))
        if not share:
            return TrainingData(export, export.label_space, None)
        rendered = PreRendered(
            render.RenderedProducts(
                rendered_products_to_mix(len(export.products), share), int(spec.get("rendered_views", 2))
            )
        )
        # rendered products inside the shop's metric space only when asked (`rendered_metric`): see datasets.mixed
        mixed = MixedRecords(
            [(export, export.label_space), (rendered, render.LABEL_SPACE)],
            metric_parts=(True, bool(spec.get("rendered_metric", False))),
        )
        return TrainingData(mixed, mixed.label_space, None)
    raise ValueError(f"unknown training dataset {name!r} ({' | '.join(TRAINING_DATASETS)})")


def rendered_products_to_mix(products: int, share: float) -> int:
    """How many rendered products make up `share` of the products trained on, beside `products` of a shop's."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"mix_rendered is a share of the products trained on, in [0, 1): got {share}")
    return math.ceil(products * share / (1.0 - share))


def _validator(catalog: Sequence[Record], label_space: LabelSpace) -> Callable:
    """Per-epoch retrieval of held-out catalog photos from shopper views of them (always the same views)."""
    return retrieval_validator(catalog, _shopper_views(catalog, VALIDATION_QUERY_SEED, QUERY_STRENGTH), label_space)


class Slice(Sequence[Record]):
    """records[start:stop] without loading them, keeping the cheap `instance_ids` the sampler uses."""

    def __init__(self, records: Sequence[Record], start: int, stop: int) -> None:
        self.records, self.start, self.stop = records, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.records[self.start + index]

    @property
    def instance_ids(self) -> np.ndarray:
        from workers.ml.datasets.torch_dataset import instance_ids

        return instance_ids(self.records)[self.start : self.stop]


class PreRendered(Sequence[Record]):
    """Draw every record of a (lazily rendering) dataset once, up front: rendering costs more than training."""

    def __init__(self, records: Sequence[Record]) -> None:
        if len(records) > RENDER_CACHE_LIMIT:
            raise ValueError(f"pre-rendering {len(records)} records exceeds RENDER_CACHE_LIMIT={RENDER_CACHE_LIMIT}")
        from workers.ml.datasets.torch_dataset import instance_ids

        self._ids = instance_ids(records)
        self._records = [records[i] for i in range(len(records))]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        return self._records[index]

    @property
    def instance_ids(self) -> np.ndarray:
        return self._ids


# ---------------------------------------------------------------------------------------------- evaluation


def evaluation_sets(
    name: str,
    *,
    catalog_size: int,
    num_queries: int,
    seed: int = 0,
    strength: str = QUERY_STRENGTH,
    root: str | Path | None = None,
) -> EvaluationSets:
    """Catalog and shopper-photo queries for evaluation, never drawn from training data.

    fashion-mnist and renderer: the catalog's shopper views (`strength`) are the queries. deepfashion-inshop
    (data under `root`): the benchmark's own split, gallery photos as the catalog and the real "query" photos
    of the same items as queries (`strength` is not used); both capped at the sizes asked for.
    """
    if name == "deepfashion-inshop":
        gallery = DeepFashionInShop(_data_root(name, root), "gallery")
        query_split = DeepFashionInShop(_data_root(name, root), "query", label_space=gallery.label_space)
        catalog = [gallery[i] for i in range(min(catalog_size, len(gallery)))]
        in_catalog = {record.instance_id for record in catalog}
        # only queries whose item the catalog holds: R@k asks "is it ranked first", not "is it there at all"
        wanted = [i for i, instance in enumerate(query_split.instance_ids) if instance in in_catalog][:num_queries]
        return EvaluationSets(catalog, [query_split[i] for i in wanted], gallery.label_space)
    if name == "fashion-mnist":
        records = fashion_mnist.load_records("t10k")
        label_space = fashion_mnist.LABEL_SPACE
        catalog = [records[i] for i in range(min(catalog_size, len(records)))]
    elif name == "renderer":
        label_space = render.LABEL_SPACE
        catalog = [render.render_product(render.EVAL_FIRST_SEED + i, 0) for i in range(catalog_size)]
    else:
        raise ValueError(f"unknown evaluation dataset {name!r} ({' | '.join(EVALUATION_DATASETS)})")
    return EvaluationSets(catalog, shopper_queries(catalog, num_queries, seed=seed, strength=strength), label_space)


@functools.cache
def landmark_heldout_views(
    products: int = LANDMARK_HELDOUT_PRODUCTS, views: int = LANDMARK_HELDOUT_VIEWS
) -> tuple[Record, ...]:
    """Rendered catalog photos, with landmarks, visibility and the item's box, of products from a seed range that
    no training run, demo shop, evaluation or benchmark catalog draws from: where a version's landmark branch is
    measured (workers.ml.evaluation.landmark_report). Drawn once per process (a few seconds)."""
    rendered = render.RenderedProducts(products, views, first_seed=render.LANDMARK_HELDOUT_FIRST_SEED)
    return tuple(rendered[i] for i in range(len(rendered)))


def shopper_queries(catalog: Sequence[Record], num_queries: int, *, seed: int, strength: str) -> list[Record]:
    """The evaluation's shopper photos of catalog items (each item in turn), fixed by the seed."""
    picks = [catalog[i % len(catalog)] for i in range(num_queries)]
    return _shopper_views(picks, EVALUATION_QUERY_SEED + seed, strength)


def _shopper_views(records: Sequence[Record], seed: int, strength: str) -> list[Record]:
    rng = np.random.default_rng(seed)
    return [shopper_view(record, rng, strength) for record in records]


def _data_root(name: str, root: str | Path | None) -> Path:
    if not root:
        raise ValueError(f"{name} needs the folder the user downloaded it to (--data-root / dataset.root)")
    return Path(root)
