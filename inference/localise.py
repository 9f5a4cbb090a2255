"""Where the item is in a photo, from the network's own activation map, and a query encoded with its item.

No weights of its own and no torch: every exported version also returns the channel mean of its last feature maps
(`activation_map`, SCDA: Wei et al., "Selective Convolutional Descriptor Aggregation", TIP 2017), high where an
object is. Each summit of the map is an item, boxed where the map stays above LEVEL of the way from the background to
that summit, and scored by its height relative to the highest. A photo of two products on a table, apart, gives two
boxes, the stronger first; at 7 x 7 cells (224 px), items closer than about a cell (a seventh of the photo's longer
side) merge into one box, and the boxes are coarse (about a cell on each side).

    boxes = item_boxes(activation_map, letterbox)           # what Encoder.encode attaches to each image
    encoding, boxes, fused = encode_with_item(encoder, photo, weight=0.5)   # the photo and its best box, mixed

Fusion: the photo is encoded again cropped to its best box (the item at the network's full input resolution instead
of a few dozen of its pixels), and the two are mixed before anything is compared: fc7 as the normalised weighted
sum, the hash logits as the weighted sum (so the code bits are the signs of the mixed projection: version 0's
logits are linear in the pooled descriptor), category probabilities as the weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from inference.preprocess import Letterbox

if TYPE_CHECKING:
    from inference.encoder import Encoder, Encoding

# The last feature maps are 7 x 7 at 224 px (stride 32): the map is upsampled this many times (bilinear) before
# it is thresholded, so that box edges fall between cells instead of on them.
UPSAMPLE = 8
MAX_ITEM_BOXES = 4  # a shopper picks among a few; past that the regions are background texture
# SCDA keeps the cells above the map's mean; at 7 x 7 the receptive fields blur an item (and the plain background
# next to it) above the mean, and two items into one region. So each summit of the map is an item of its own, boxed
# where the map stays above LEVEL of the way from the background (the map's BACKGROUND_QUANTILE) to that summit;
# a summit inside an item already boxed is that item's. Checked on synthetic scenes (tests/inference/).
LEVEL = 0.5
BACKGROUND_QUANTILE = 0.2
MIN_PEAK = 0.3  # a summit is an item when it rises this far of the way from the background to the highest one
# No second encode when the best box covers this much of the photo already: the crop would be the photo.
FUSE_MAX_AREA = 0.8


@dataclass(frozen=True)
class ItemBox:
    """An item's box as fractions of the photo (x0 < x1, y0 < y1, within 0..1), and its share of the activation."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def area(self) -> float:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def as_list(self) -> list[float]:
        return [round(self.x0, 4), round(self.y0, 4), round(self.x1, 4), round(self.y1, 4)]

    def as_row(self) -> list[float]:
        """[x0, y0, x1, y1, score]: how a QueryEncoding (and a worker's JSON answer) carries it."""
        return [*self.as_list(), round(self.score, 4)]

    def within(self, outer: tuple[float, float, float, float]) -> ItemBox:
        """This box (fractions of a crop) as fractions of the photo the crop `outer` was cut from."""
        ox0, oy0, ox1, oy1 = outer
        w, h = ox1 - ox0, oy1 - oy0
        return ItemBox(ox0 + self.x0 * w, oy0 + self.y0 * h, ox0 + self.x1 * w, oy0 + self.y1 * h, self.score)


def item_boxes(activation: np.ndarray, letterbox: Letterbox, *, max_boxes: int = MAX_ITEM_BOXES) -> list[ItemBox]:
    """An image's (h, w) activation map (over the letterboxed square input) -> its item boxes, best first, in
    fractions of the original image. Empty when the map is flat (nothing stands out)."""
    activation = np.asarray(activation, np.float32)
    rows, cols = activation.shape
    fine = cv2.resize(activation, (cols * UPSAMPLE, rows * UPSAMPLE), interpolation=cv2.INTER_LINEAR)
    # the picture's own part of the square (the letterbox padding is no part of the photo)
    region = _picture_part(fine, letterbox)
    floor, top = float(np.quantile(region, BACKGROUND_QUANTILE)), float(region.max())
    if top - floor <= 1e-6 * max(abs(top), 1e-12):
        return []
    height, width = region.shape
    boxes: list[ItemBox] = []
    for y, x in _peaks(region, floor + MIN_PEAK * (top - floor)):
        if any(b.x0 <= x / width <= b.x1 and b.y0 <= y / height <= b.y1 for b in boxes):
            continue  # a second summit of an item already boxed
        peak = float(region[y, x])
        # the item around this summit: the connected cells above LEVEL of the way from the background to it
        labels, _ = _components(region > floor + LEVEL * (peak - floor))
        ys, xs = np.nonzero(labels == labels[y, x])
        boxes.append(
            ItemBox(
                float(xs.min() / width),
                float(ys.min() / height),
                float((xs.max() + 1) / width),
                float((ys.max() + 1) / height),
                round((peak - floor) / (top - floor), 4),
            )  # fmt: skip
        )
        if len(boxes) == max_boxes:
            break
    return boxes


def _picture_part(fine: np.ndarray, letterbox: Letterbox) -> np.ndarray:
    side_y, side_x = fine.shape
    x0 = int(round(letterbox.offset_x * side_x))
    y0 = int(round(letterbox.offset_y * side_y))
    x1 = max(x0 + 1, int(round((letterbox.offset_x + letterbox.scale_x) * side_x)))
    y1 = max(y0 + 1, int(round((letterbox.offset_y + letterbox.scale_y) * side_y)))
    return fine[y0:y1, x0:x1]


def _peaks(region: np.ndarray, at_least: float) -> list[tuple[int, int]]:
    """The local maxima (3 x 3 neighbourhoods on the map's own grid, i.e. UPSAMPLE wide) at or above `at_least`,
    highest first."""
    kernel = np.ones((2 * UPSAMPLE + 1, 2 * UPSAMPLE + 1), np.uint8)
    summits = (region >= cv2.dilate(region, kernel)) & (region >= at_least)
    ys, xs = np.nonzero(summits)
    order = np.argsort(-region[ys, xs], kind="stable")
    return [(int(ys[i]), int(xs[i])) for i in order]


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of a boolean mask: (labels, count), label 0 = outside."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return labels, count - 1


def crop_to(image: Image.Image, box: ItemBox) -> Image.Image:
    width, height = image.size
    left, top = int(box.x0 * width), int(box.y0 * height)
    right = max(left + 1, int(np.ceil(box.x1 * width)))
    bottom = max(top + 1, int(np.ceil(box.y1 * height)))
    return image.crop((left, top, right, bottom))


def encode_with_item(encoder: Encoder, image: Image.Image, *, weight: float) -> tuple[Encoding, list[ItemBox], bool]:
    """One photo's Encoding (one row), its item boxes, and whether the encoding is fused. With `weight` > 0 and a
    best box that is not the whole photo, the photo cropped to that box is encoded too and mixed in with this weight
    (0: the whole photo alone, 1: the box alone)."""
    whole = encoder.encode([image], boxes=True)
    boxes = list(whole.item_boxes[0]) if whole.item_boxes else []
    if weight <= 0 or not boxes or boxes[0].area >= FUSE_MAX_AREA:
        return whole, boxes, False
    item = encoder.encode([crop_to(image, boxes[0])])
    return fuse(whole, item, weight=weight), boxes, True


def fuse(whole: Encoding, item: Encoding, *, weight: float) -> Encoding:
    """Two one-row Encodings of the same photo mixed: `weight` of the item's, the rest the whole photo's. The
    heads that are positions in the photo (landmarks, boxes) stay the whole photo's."""
    from inference.encoder import Encoding, pack_bits

    def mix(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
        return None if a is None or b is None else ((1 - weight) * a + weight * b).astype(np.float32)

    fc7 = mix(whole.fc7, item.fc7)
    assert fc7 is not None  # every network has fc7
    fc7 /= np.maximum(np.linalg.norm(fc7, axis=1, keepdims=True), 1e-12)
    logits = mix(whole.hash_logits, item.hash_logits)
    bits = logits > 0 if logits is not None else whole.bits
    return Encoding(
        bits=bits,
        codes=pack_bits(bits),
        fc7=fc7,
        category_probs=mix(whole.category_probs, item.category_probs),
        attribute_probs=mix(whole.attribute_probs, item.attribute_probs),
        landmarks=whole.landmarks,
        visibility=whole.visibility,
        hash_logits=logits,
        item_boxes=whole.item_boxes,
    )
