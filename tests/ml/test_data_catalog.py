import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.ml.ml_helpers import write_idx
from workers.ml.datasets.catalog_export import (
    CatalogExport,
    CatalogProduct,
    read_manifest,
    write_catalog_export,
)
from workers.ml.datasets.products import fashion_mnist_products, render_catalog, shopper_query
from workers.ml.records import LabelSpace

ROOT = Path(__file__).resolve().parents[2]


def _product(sku, category, attributes, colours):
    return CatalogProduct(sku, category, attributes, f"title {sku}", [Image.new("RGB", (20, 16), c) for c in colours])


def test_catalog_export_round_trip(tmp_path):
    products = [
        _product("A/1", "dress", ("colour:red", "pattern:stripes"), ["red", "pink"]),
        _product("B-2", "shoe", ("colour:blue",), ["blue"]),
        _product("C-3", "dress", (), ["green", "white", "black"]),
    ]
    manifest = write_catalog_export(tmp_path, products)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert lines[0]["sku"] == "A/1" and lines[0]["images"] == ["images/A_1-0.png", "images/A_1-1.png"]

    dataset = CatalogExport(tmp_path)
    assert dataset.label_space == LabelSpace(("dress", "shoe"), ("colour:blue", "colour:red", "pattern:stripes"), 0)
    assert len(dataset) == 6
    assert dataset.instance_ids.tolist() == [0, 0, 1, 2, 2, 2]
    first, shoe, plain = dataset[1], dataset[2], dataset[3]
    assert first.instance_id == 0 and first.category == 0 and first.extra["sku"] == "A/1"
    assert first.attributes.tolist() == [0, 1, 1] and first.landmarks is None
    assert tuple(np.asarray(first.image)[0, 0]) == (255, 192, 203)  # pink, the product's second photo
    assert shoe.category == 1 and shoe.attributes.tolist() == [1, 0, 0]
    assert plain.attributes.tolist() == [0, 0, 0]


def test_catalog_export_with_a_fixed_label_space_and_unknown_labels(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.jpg")
    rows = [
        {"sku": "x", "category": "hat", "attributes": ["colour:red", "new:thing"], "images": ["a.jpg"]},
        {"sku": "y", "category": None, "images": ["a.jpg"], "price": 12},
    ]
    (tmp_path / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    space = LabelSpace(("dress", "hat"), ("colour:blue", "colour:red"), 8)
    dataset = CatalogExport(tmp_path, space)
    assert dataset[0].category == 1 and dataset[0].attributes.tolist() == [0, 1]
    assert dataset[1].category == -1 and dataset[1].attributes is None  # attributes unknown, not "none"
    assert read_manifest(tmp_path)[1].extra == {"price": 12}
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"sku": "z", "images": []}) + "\n")
    with pytest.raises(ValueError, match="manifest.jsonl:1"):
        CatalogExport(tmp_path)


def test_render_catalog_gives_distinct_products_with_several_photos():
    catalog = render_catalog(12, images_per_product=2, seed=1, size=48)
    assert len({p.id for p in catalog}) == 12
    product = catalog[0]
    assert len(product.images) == 2 and product.images[0].size == (48, 48)
    assert product.title and product.attributes and product.category
    assert product.images[0].tobytes() != product.images[1].tobytes()
    again = render_catalog(1, images_per_product=1, seed=1, size=48)[0]
    assert again.id == product.id and again.images[0].tobytes() == product.images[0].tobytes()
    assert render_catalog(1, 1, seed=2, size=48)[0].id != product.id


def test_fashion_mnist_products_from_a_tiny_split(tmp_path):
    images = np.zeros((6, 28, 28), np.uint8)
    images[:, 5:22, 9:19] = np.arange(6, dtype=np.uint8)[:, None, None] * 30 + 40
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(6, dtype=np.uint8))
    products = fashion_mnist_products(n=4, images_per_product=3, seed=0, root=tmp_path)
    assert len(products) == 4 and len({p.id for p in products}) == 4
    product = products[0]
    assert product.id.startswith("FM-t10k-") and product.attributes == ()
    assert len(product.images) == 3 and product.images[0].size == (112, 112)
    assert product.images[1].tobytes() != product.images[0].tobytes()
    assert [p.id for p in fashion_mnist_products(n=4, seed=0, root=tmp_path)] == [p.id for p in products]


def test_shopper_query_is_deterministic():
    image = render_catalog(1, 1, size=64)[0].images[0]
    assert shopper_query(image, 3).tobytes() == shopper_query(image, 3).tobytes()
    assert shopper_query(image, 3).tobytes() != shopper_query(image, 4).tobytes()


def test_demo_catalog_functions_do_not_load_torch():
    program = (
        "import sys\n"
        "from workers.ml.datasets import render_catalog, shopper_query, CatalogExport, fashion_mnist_products\n"
        "shopper_query(render_catalog(1, 1, size=32)[0].images[0], 0)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
