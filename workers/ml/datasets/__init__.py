"""Every source of labelled images, each yielding `workers.ml.records.Record`s.

- `render`: procedural garments/shoes/bags with landmarks, attributes and instance identity (`RenderedProducts`).
- `fashion_mnist`: the Debian package's 70k Zalando photos (`load_records("train" | "t10k")`, `LABEL_SPACE`).
- `deepfashion`: In-shop retrieval and Category-and-Attribute benchmark readers (data brought by the user).
- `catalog_export`: an exported shop catalog (`manifest.jsonl` + images; format in its docstring).
- `products`: demo catalogs and shopper photos (`render_catalog`, `fashion_mnist_products`, `shopper_query`).
- `torch_dataset`: `RecordDataset` (Records -> (letterboxed tensor, Record), optional shopper views),
  `pk_loader` / `plain_loader`, `prepare_record`.

Shopper-view augmentation lives in `workers.ml.augment`, the P x K sampler in `workers.ml.sampler`.
Only `torch_dataset` needs torch, and it is imported on first use: the demo-catalog functions run in
processes that never load torch.
"""

from typing import Any

from workers.ml.datasets.catalog_export import CatalogExport, CatalogProduct, write_catalog_export
from workers.ml.datasets.deepfashion import DeepFashionCategoryAttribute, DeepFashionInShop
from workers.ml.datasets.fashion_mnist import LABEL_SPACE as FASHION_MNIST_LABEL_SPACE
from workers.ml.datasets.fashion_mnist import FashionMnist, ensure_fashion_mnist
from workers.ml.datasets.fashion_mnist import load_records as fashion_mnist_records
from workers.ml.datasets.products import fashion_mnist_products, render_catalog, shopper_query
from workers.ml.datasets.render import LABEL_SPACE as RENDER_LABEL_SPACE
from workers.ml.datasets.render import RenderedProducts, product_spec, render_product

_TORCH_NAMES = ("RecordDataset", "instance_ids", "pk_loader", "plain_loader", "prepare_record")


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        from workers.ml.datasets import torch_dataset

        return getattr(torch_dataset, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DeepFashionCategoryAttribute",
    "DeepFashionInShop",
    "CatalogExport",
    "CatalogProduct",
    "write_catalog_export",
    "fashion_mnist_products",
    "render_catalog",
    "shopper_query",
    "FASHION_MNIST_LABEL_SPACE",
    "FashionMnist",
    "ensure_fashion_mnist",
    "fashion_mnist_records",
    "RENDER_LABEL_SPACE",
    "RecordDataset",
    "RenderedProducts",
    "instance_ids",
    "pk_loader",
    "plain_loader",
    "prepare_record",
    "product_spec",
    "render_product",
]
