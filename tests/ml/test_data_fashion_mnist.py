import gzip

import numpy as np
import pytest

from tests.ml.ml_helpers import write_idx
from workers.ml.datasets import fashion_mnist
from workers.ml.datasets.debian import data_dir
from workers.ml.datasets.fashion_mnist import (
    CLASSES,
    SYSTEM_DIR,
    FashionMnistUnavailable,
    ensure_fashion_mnist,
    load_records,
    product_masks,
    read_idx,
)


def _tiny_split(directory, split, images, labels, compress=True):
    suffix = ".gz" if compress else ""
    write_idx(directory / f"{split}-images-idx3-ubyte{suffix}", images)
    write_idx(directory / f"{split}-labels-idx1-ubyte{suffix}", labels)


def test_read_idx_parses_the_real_header_layout(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    # Written by hand, byte for byte as in the original files: magic 0x00000803, then sizes, then pixels.
    raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4]) + images.tobytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(raw)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "wb") as file:
        file.write(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    (tmp_path / "bad").write_bytes(raw[:-1])
    with pytest.raises(ValueError):
        read_idx(tmp_path / "bad")


def test_records_from_a_tiny_split(tmp_path):
    rng = np.random.default_rng(0)
    images = np.zeros((5, 28, 28), np.uint8)
    images[:, 6:20, 8:18] = rng.integers(40, 255, (5, 14, 10))
    images[:, 10:12, 10:14] = 0  # a dark patch inside the product is still product
    labels = np.array([0, 3, 9, 3, 1], np.uint8)
    _tiny_split(tmp_path, "train", images, labels, compress=False)
    _tiny_split(tmp_path, "t10k", images[:2], labels[:2])
    records = load_records("train", root=tmp_path)
    assert len(records) == 5 and list(records.instance_ids) == [0, 1, 2, 3, 4]
    record = records[2]
    assert record.image.mode == "RGB" and record.image.size == (28, 28)
    assert record.category == 9 and CLASSES[record.category] == "Ankle boot"
    assert record.instance_id == 2 and record.extra["split"] == "train"
    mask = np.asarray(record.extra["mask"]) > 0
    assert mask[6:20, 8:18].all() and mask.sum() == 14 * 10
    # the product keeps its own grey levels; the black studio backdrop becomes white, as shops photograph products
    pixels = np.asarray(record.image)[..., 0]
    np.testing.assert_array_equal(pixels[mask], images[2][mask])
    assert (pixels[~mask] == 255).all()
    test = load_records("t10k", root=tmp_path)
    assert len(test) == 2 and test[1].extra["split"] == "t10k"
    with pytest.raises(ValueError):
        load_records("validation", root=tmp_path)


def test_product_mask_keeps_enclosed_dark_pixels_and_drops_the_border():
    image = np.zeros((1, 8, 8), np.uint8)
    image[0, 2:6, 2:6] = 200
    image[0, 3:5, 3:5] = 0
    mask = product_masks(image)[0]
    assert mask[2:6, 2:6].all() and mask.sum() == 16


def test_missing_package_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    with pytest.raises(FashionMnistUnavailable, match="apt-get download dataset-fashion-mnist"):
        ensure_fashion_mnist(root=tmp_path)


def test_data_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOP_SEARCH_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    (tmp_path / "fashion-mnist").mkdir()
    _tiny_split(tmp_path / "fashion-mnist", "train", np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.uint8))
    _tiny_split(tmp_path / "fashion-mnist", "t10k", np.zeros((1, 28, 28), np.uint8), np.zeros(1, np.uint8))
    assert ensure_fashion_mnist() == tmp_path / "fashion-mnist"


def _real_copy():
    for directory in (data_dir() / "fashion-mnist", SYSTEM_DIR):
        if fashion_mnist._complete(directory):
            return directory
    return None


@pytest.mark.skipif(_real_copy() is None, reason="the Debian Fashion-MNIST files are not on this machine")
def test_the_real_files_when_present():
    arrays = fashion_mnist.load_arrays("t10k", root=_real_copy())
    assert arrays.images.shape == (10000, 28, 28) and arrays.images.dtype == np.uint8
    assert np.bincount(arrays.labels).tolist() == [1000] * 10
