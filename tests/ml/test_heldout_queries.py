"""The held-out query generator and the honest benchmark's data: deterministic, realistic, and held out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from workers.ml.datasets import real_photos
from workers.ml.datasets.debian import PackageUnavailable
from workers.ml.datasets.render import render_product
from workers.ml.datasets.shop_benchmark import benchmark_catalog, benchmark_queries
from workers.ml.heldout_queries import HELDOUT, heldout_query, kelvin_gains, procedural_surface, product_mask


def _product() -> tuple[Image.Image, Image.Image]:
    record = render_product(12345, size=128)
    return record.image, record.extra["mask"]


def test_a_query_is_deterministic_for_a_seed_and_differs_between_seeds():
    image, mask = _product()
    first = np.asarray(heldout_query(image, 7, mask=mask))
    again = np.asarray(heldout_query(image, 7, mask=mask))
    other = np.asarray(heldout_query(image, 8, mask=mask))
    assert first.shape == (HELDOUT.canvas, HELDOUT.canvas, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_the_product_is_on_a_new_surface_smaller_in_the_frame():
    image, mask = _product()
    photo = heldout_query(image, 3, mask=mask, strength="heldout-mild")
    catalog = np.asarray(image.resize(photo.size), np.float32)
    # the catalog backdrop is light and plain; the query's border is a surface, not that backdrop
    backdrop = np.median(np.concatenate([catalog[0], catalog[-1]]), axis=0)
    border = np.asarray(photo, np.float32)[[0, -1]].reshape(-1, 3)
    assert np.linalg.norm(border.mean(axis=0) - backdrop) > 20


def test_product_mask_finds_a_product_on_white_and_not_on_a_busy_photo():
    image = Image.new("RGB", (100, 100), "white")
    image.paste((200, 30, 30), (30, 20, 70, 90))
    mask = np.asarray(product_mask(image)) > 127
    assert mask[50, 50] and not mask[5, 5]
    assert 0.2 < mask.mean() < 0.4
    busy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert (np.asarray(product_mask(busy)) > 127).mean() > 0.5  # no backdrop to tell apart: keep most of it


def test_colour_temperature_gains_are_neutral_at_daylight_and_warm_below_it():
    assert np.allclose(kelvin_gains(6500.0), 1.0)
    tungsten = kelvin_gains(3000.0)
    assert tungsten[0] >= 1.0 > tungsten[2]


def test_procedural_surfaces_are_textured():
    for seed in range(8):
        surface = np.asarray(procedural_surface(64, np.random.default_rng(seed)), np.float32)
        assert surface.std() > 2.0


def test_benchmark_splits_hold_different_products_and_queries_point_at_their_product():
    validation = benchmark_catalog(size=6, split="validation", seed=0, fashion_mnist_share=0.0)
    test = benchmark_catalog(size=6, split="test", seed=0, fashion_mnist_share=0.0)
    assert not {p.sku for p in validation} & {p.sku for p in test}
    assert benchmark_catalog(size=6, split="test", seed=1, fashion_mnist_share=0.0)[0].sku != test[0].sku
    queries = benchmark_queries(test, count=4, seed=0, strength="heldout")
    assert len({q.product_index for q in queries}) == 4
    assert all(q.source == test[q.product_index].source == "rendered" for q in queries)
    with pytest.raises(ValueError):
        benchmark_catalog(size=2, split="train", seed=0)


def _opencv_samples():
    try:
        return real_photos.ensure_opencv_samples()
    except PackageUnavailable:
        return None


@pytest.mark.skipif(_opencv_samples() is None, reason="Debian's opencv-doc sample photos cannot be had here")
def test_real_photo_pairs_are_two_different_photographs_of_one_object():
    pairs = real_photos.real_photo_pairs()
    assert [pair.name for pair, _, _ in pairs] == [pair.name for pair in real_photos.PAIRS]
    for _, catalog_photo, query_photo in pairs:
        assert catalog_photo.mode == query_photo.mode == "RGB"
        assert (
            catalog_photo.size != query_photo.size
            or np.asarray(catalog_photo).tobytes() != np.asarray(query_photo).tobytes()
        )
    assert len(real_photos.background_photos()) == len(real_photos.BACKGROUND_FILES)
