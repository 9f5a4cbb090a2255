"""Every source of labelled images, each yielding `workers.ml.records.Record`s.

- `render`: procedural garments/shoes/bags with landmarks, attributes and instance identity (`RenderedProducts`).
- `torch_dataset`: `Preprocess`, `RecordDataset` (Records -> (tensor, Record), optional shopper views),
  `pk_loader` / `plain_loader`.

Shopper-view augmentation lives in `workers.ml.augment`, the P x K sampler in `workers.ml.sampler`.
"""

from workers.ml.datasets.render import LABEL_SPACE as RENDER_LABEL_SPACE
from workers.ml.datasets.render import RenderedProducts, product_spec, render_product
from workers.ml.datasets.torch_dataset import (
    Preprocess,
    RecordDataset,
    instance_ids,
    pk_loader,
    plain_loader,
    preprocess_image,
)

__all__ = [
    "RENDER_LABEL_SPACE",
    "Preprocess",
    "RecordDataset",
    "RenderedProducts",
    "instance_ids",
    "pk_loader",
    "plain_loader",
    "preprocess_image",
    "product_spec",
    "render_product",
]
