"""A dataset over an exported shop catalog: several photos per product, category and attributes, no landmarks.

Export format (written only through `CatalogExportWriter`: by the retraining pipeline from the shop's catalog,
workers.pipelines, and by `write_catalog_export` from products in memory; read here by `CatalogExport`):

    <export dir>/
        manifest.jsonl      one product per line, UTF-8 JSON
        images/...          the image files (any format PIL reads), paths relative to the export dir

    {"sku": "SKU-123", "category": "dress", "attributes": ["colour:red", "pattern:stripes"],
     "images": ["images/SKU-123-0.jpg", "images/SKU-123-1.jpg"], "title": "Red striped dress"}

- `sku` (required) identifies the product; every image of one product shares its instance_id, which is the
  product's line number (0-based) in the manifest.
- `category` (string or null): the category name; null/missing/unknown -> category -1 (masked in training).
- `attributes` (list of strings): attribute names that are true for the product; a missing key means
  "unknown" (no attribute labels), an empty list means "none of them".
- `images` (list, at least one): relative paths. `title` and any other keys are kept in `Record.extra`.

The LabelSpace is built from the manifest (sorted category and attribute names) unless one is passed in,
as when fine-tuning a model whose vocabularies are fixed; names outside it then count as unknown.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from workers.ml.records import LabelSpace, Record

MANIFEST_NAME = "manifest.jsonl"
IMAGES_DIR = "images"


@dataclass(frozen=True)
class ExportedProduct:
    """One manifest line."""

    sku: str
    category: str | None
    attributes: tuple[str, ...] | None  # None = not labelled
    images: tuple[str, ...]  # relative paths
    title: str = ""
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_json(cls, data: dict) -> ExportedProduct:
        if not data.get("sku") or not data.get("images"):
            raise ValueError(f"a manifest line needs a sku and at least one image: {data}")
        known = {"sku", "category", "attributes", "images", "title"}
        attributes = data.get("attributes")
        return cls(
            sku=str(data["sku"]),
            category=data.get("category") or None,
            attributes=tuple(attributes) if attributes is not None else None,
            images=tuple(data["images"]),
            title=data.get("title") or "",
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_json(self) -> dict:
        data: dict = {"sku": self.sku, "category": self.category, "images": list(self.images)}
        if self.attributes is not None:
            data["attributes"] = list(self.attributes)
        if self.title:
            data["title"] = self.title
        return {**self.extra, **data}


@dataclass
class CatalogProduct:
    """A product with its images in memory: what the demo generators return and `write_catalog_export` takes."""

    id: str  # becomes the sku
    category: str
    attributes: tuple[str, ...]
    title: str
    images: list[Image.Image]


def read_manifest(directory: Path | str) -> list[ExportedProduct]:
    path = Path(directory) / MANIFEST_NAME
    products = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                products.append(ExportedProduct.from_json(json.loads(line)))
            except (ValueError, TypeError) as error:
                raise ValueError(f"{path}:{number}: {error}") from error
    return products


def label_space_from_products(products: Iterable[ExportedProduct]) -> LabelSpace:
    """Sorted vocabularies of every category and attribute name the products use."""
    products = list(products)
    categories = sorted({p.category for p in products if p.category})
    attributes = sorted({a for p in products for a in (p.attributes or ())})
    return LabelSpace(categories=tuple(categories), attributes=tuple(attributes), num_landmarks=0)


class CatalogExport(Sequence[Record]):
    """Every image of every product in an export, as Records (images are read on access)."""

    def __init__(self, directory: Path | str, label_space: LabelSpace | None = None) -> None:
        self.directory = Path(directory)
        self.products = read_manifest(self.directory)
        self.label_space = label_space or label_space_from_products(self.products)
        self._categories = {name: i for i, name in enumerate(self.label_space.categories)}
        self._attributes = {name: i for i, name in enumerate(self.label_space.attributes)}
        # (product number, image path) for every image, in manifest order.
        self.items = [(number, image) for number, p in enumerate(self.products) for image in p.images]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        number, relative = self.items[index]
        product = self.products[number]
        with Image.open(self.directory / relative) as file:
            image = ImageOps.exif_transpose(file).convert("RGB")
        attributes = None
        if product.attributes is not None and self.label_space.attributes:
            attributes = np.zeros(len(self.label_space.attributes), np.float32)
            for name in product.attributes:
                if name in self._attributes:
                    attributes[self._attributes[name]] = 1.0
        return Record(
            image=image,
            instance_id=number,
            category=self._categories.get(product.category or "", -1),
            attributes=attributes,
            extra={"source": "catalog-export", "sku": product.sku, "path": relative, "title": product.title},
        )

    @property
    def instance_ids(self) -> np.ndarray:
        return np.array([number for number, _ in self.items])


class CatalogExportWriter:
    """Writes an export one product at a time (a shop's catalog is streamed from its database, not held)."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        (self.directory / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        self.manifest = self.directory / MANIFEST_NAME
        self._file = self.manifest.open("w", encoding="utf-8")

    def add(
        self,
        *,
        sku: str,
        category: str | None,
        attributes: Iterable[str] | None,
        title: str = "",
        images: Iterable[tuple[str, bytes]],
    ) -> bool:
        """One product; `images` are (file name, file contents), stored under images/. A product without an image
        is left out (a manifest line needs one): returns whether it was written."""
        paths = []
        for name, data in images:
            relative = f"{IMAGES_DIR}/{name}"
            (self.directory / relative).write_bytes(data)
            paths.append(relative)
        if not paths:
            return False
        labels = tuple(attributes) if attributes is not None else None
        line = ExportedProduct(sku, category or None, labels, tuple(paths), title)
        self._file.write(json.dumps(line.to_json(), ensure_ascii=False) + "\n")
        return True

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CatalogExportWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_catalog_export(directory: Path | str, products: Iterable[CatalogProduct], image_format: str = "png") -> Path:
    """Write products and their images in the export format; returns the manifest path."""
    pil_format = Image.registered_extensions()[f".{image_format}"]
    with CatalogExportWriter(directory) as writer:
        for product in products:
            stem = re.sub(r"[^A-Za-z0-9._-]+", "_", product.id)
            images = [
                (f"{stem}-{i}.{image_format}", _encoded(image, pil_format)) for i, image in enumerate(product.images)
            ]
            writer.add(
                sku=product.id,
                category=product.category,
                attributes=product.attributes,
                title=product.title,
                images=images,
            )
    return writer.manifest


def _encoded(image: Image.Image, pil_format: str) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=pil_format)
    return buffer.getvalue()
