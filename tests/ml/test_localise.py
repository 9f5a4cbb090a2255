"""Item boxes from the network's own activation map (inference.localise): on synthetic maps, and on photos made by
pasting rendered products at known places, read through version 0's ONNX export (no torch in the reading)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.encoder import Encoder
from inference.localise import FUSE_MAX_AREA, ItemBox, encode_with_item, fuse, item_boxes
from inference.preprocess import Letterbox
from workers.ml.baseline import fit_baseline
from workers.ml.datasets.render import render_product
from workers.ml.export import export

SQUARE = Letterbox(0.0, 0.0, 1.0, 1.0)  # a square photo fills the input


def _blob(centre: tuple[float, float], *, size: int = 7, height: float = 1.0, width: float = 0.7) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    cx, cy = centre[0] * size, centre[1] * size
    return (height * np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * width**2))).astype(np.float32)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_one_bump_in_the_map_gives_one_box_around_it():
    boxes = item_boxes(0.05 + _blob((0.3, 0.6)), SQUARE)
    assert len(boxes) == 1 and boxes[0].score == 1.0
    box = boxes[0]
    assert box.x0 < 0.3 < box.x1 and box.y0 < 0.6 < box.y1
    assert box.area < 0.25  # around the bump, not the whole photo


def test_two_bumps_give_two_boxes_the_stronger_first_and_a_flat_map_none():
    boxes = item_boxes(_blob((0.2, 0.3)) + _blob((0.8, 0.7), height=0.6), SQUARE)
    assert len(boxes) == 2
    first, second = boxes
    assert first.x0 < 0.2 < first.x1 and second.x0 < 0.8 < second.x1 and first.score > second.score
    assert _iou(first.as_list(), second.as_list()) == 0
    assert item_boxes(np.full((7, 7), 0.3, np.float32), SQUARE) == []


def test_boxes_are_fractions_of_the_photo_not_of_the_letterboxed_square():
    # a photo twice as wide as high sits in the middle half of the square input
    wide = Letterbox(0.0, 0.25, 1.0, 0.5)
    activation = np.zeros((7, 7), np.float32)
    activation += _blob((0.75, 0.5))  # the right-hand item, vertically in the middle of the photo
    (box,) = item_boxes(activation, wide)
    assert box.x0 > 0.5 and box.y0 < 0.5 < box.y1
    assert box.y0 >= 0 and box.y1 <= 1
    assert box.within((0.5, 0.0, 1.0, 1.0)).x0 == pytest.approx(0.5 + box.x0 / 2)


@pytest.fixture(scope="module")
def version_zero(tmp_path_factory) -> Encoder:
    """Version 0 at its native 224 px (the map is then 7 x 7), fitted on a few rendered products and read from its
    ONNX export, as the web process reads it."""
    folder = tmp_path_factory.mktemp("v0")
    products = [render_product(seed, view=0).image.convert("RGB") for seed in range(12)]
    checkpoint = fit_baseline(products, out_path=folder / "v0.pt", code_bits=32, fc7_dim=8, num_threads=1)
    return Encoder.load(export(checkpoint, num_threads=1), num_threads=1)


def _scene(placed: list[tuple[int, tuple[int, int, int]]], size: tuple[int, int]) -> tuple[Image.Image, list]:
    """Rendered products (seed, (left, top, side)) pasted on a plain table-coloured photo, and their true boxes."""
    photo = Image.new("RGB", size, (200, 190, 170))
    truth = []
    for seed, (left, top, side) in placed:
        photo.paste(render_product(seed, view=0).image.convert("RGB").resize((side, side)), (left, top))
        truth.append((left / size[0], top / size[1], (left + side) / size[0], (top + side) / size[1]))
    return photo, truth


@pytest.mark.parametrize("where", [(300, 200, 200), (40, 40, 180), (420, 60, 200)])
def test_the_best_box_of_a_photo_overlaps_the_product_where_it_was_put(version_zero, where):
    photo, (truth,) = _scene([(3, where)], (640, 480))
    encoding = version_zero.encode([photo], boxes=True)
    best = encoding.item_boxes[0][0]
    # the tile pasted is the product on its own light backdrop, the garment about 60% of it: IoU with the tile
    assert _iou(best.as_list(), truth) >= 0.3, (best, truth)
    centre = ((truth[0] + truth[2]) / 2, (truth[1] + truth[3]) / 2)
    assert best.x0 < centre[0] < best.x1 and best.y0 < centre[1] < best.y1


def test_two_products_in_one_photo_give_two_boxes_one_on_each(version_zero):
    photo, truths = _scene([(1, (20, 100, 220)), (4, (560, 100, 220))], (800, 420))
    boxes = version_zero.encode([photo], boxes=True).item_boxes[0]
    assert len(boxes) >= 2
    matched = {max(range(len(boxes)), key=lambda i: _iou(boxes[i].as_list(), truth)) for truth in truths}
    assert len(matched) == 2  # each product has a box of its own
    for truth in truths:
        assert max(_iou(box.as_list(), truth) for box in boxes) >= 0.25


def test_without_boxes_asked_for_an_encoding_carries_none(version_zero):
    photo, _ = _scene([(3, (300, 200, 200))], (640, 480))
    assert version_zero.encode([photo]).item_boxes is None


def test_the_fused_query_mixes_the_whole_photo_and_its_best_box(version_zero):
    photo, _ = _scene([(3, (300, 200, 200))], (640, 480))
    whole, boxes, fused = encode_with_item(version_zero, photo, weight=0.0)
    assert not fused and boxes and whole.fc7.shape[0] == 1
    mixed, same_boxes, fused = encode_with_item(version_zero, photo, weight=0.5)
    assert fused and same_boxes == boxes
    crop = photo.crop(
        (
            int(boxes[0].x0 * 640),
            int(boxes[0].y0 * 480),
            int(np.ceil(boxes[0].x1 * 640)),
            int(np.ceil(boxes[0].y1 * 480)),
        )
    )
    item = version_zero.encode([crop])
    expected = whole.fc7 + item.fc7
    assert np.allclose(mixed.fc7, expected / np.linalg.norm(expected), atol=1e-5)
    assert np.array_equal(mixed.bits, (whole.hash_logits + item.hash_logits) > 0)
    assert np.allclose(np.linalg.norm(mixed.fc7, axis=1), 1.0)
    boxed_alone, _, _ = encode_with_item(version_zero, photo, weight=1.0)
    assert np.allclose(boxed_alone.fc7, item.fc7, atol=1e-5)


def test_a_photo_whose_item_fills_it_is_not_encoded_twice(version_zero):
    full = render_product(3, view=0).image.convert("RGB").resize((300, 300))
    encoding, boxes, fused = encode_with_item(version_zero, full, weight=0.5)
    assert not fused or boxes[0].area < FUSE_MAX_AREA


def test_fuse_keeps_the_whole_photo_s_positions():
    def one(fc7, logits) -> object:
        from inference.encoder import Encoding, pack_bits

        bits = np.asarray(logits) > 0
        return Encoding(
            bits=bits, codes=pack_bits(bits), fc7=np.asarray(fc7, np.float32), category_probs=None,
            attribute_probs=None, landmarks=np.zeros((1, 2, 2), np.float32), visibility=None,
            hash_logits=np.asarray(logits, np.float32), item_boxes=((ItemBox(0.1, 0.1, 0.5, 0.5, 1.0),),),
        )  # fmt: skip

    whole = one([[1.0, 0.0]], [[1.0] * 4 + [-1.0] * 4])
    item = one([[0.0, 1.0]], [[-3.0] * 8])
    mixed = fuse(whole, item, weight=0.25)
    assert np.allclose(mixed.fc7, [[0.75, 0.25]] / np.linalg.norm([0.75, 0.25]))
    assert mixed.bits.tolist() == [[False] * 8]  # 0.75 - 0.75 = 0 is not positive
    assert mixed.item_boxes == whole.item_boxes and mixed.landmarks is whole.landmarks
