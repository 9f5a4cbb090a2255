"""The shopper's photo on its way to the `search` queue, the network's answer as the search reads it (QueryEncoding),
and that answer on its way back: both ends in one place.

Whichever process encodes the photo (this web process, catalog.query_encoder, or a worker,
workers.pipelines.query_encode), `query_encoding` turns the network's Encoding into the QueryEncoding the cascade
reads, so the two paths cannot drift apart. For the trip through Celery (its JSON serializer carries no bytes), the
photo travels as base64 text, a small JPEG of the already downscaled photo (`photo_to_message`), and the worker
answers with plain JSON (`encoding_to_message`: the code as pgvector bit text, fc7, the predictions and, when the
search verifies geometrically, the photo's packed local features, catalog.geometry, as base64 text, ~15 KB).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from catalog.codes import bitstring_pack, packed_bitstring

if TYPE_CHECKING:
    from inference.checkpoint import LabelSpace
    from inference.encoder import Encoding
    from inference.localise import ItemBox

ATTRIBUTE_REPORT_THRESHOLD = 0.5  # predicted attributes kept on an embedding (independent sigmoids)
CATEGORY_TOP = 5  # category probabilities returned with a query encoding
# The photo sent to a worker is already downscaled (catalog.query_encoder.QUERY_MAX_SIDE): at this quality its JPEG
# is a few tens of KB where the lossless original was often megabytes (`manage.py bench_encode` measures both).
PHOTO_JPEG_QUALITY = 90


def photo_to_message(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def photo_from_message(text: str) -> bytes:
    return base64.b64decode(text)


def photo_jpeg(image: Image.Image) -> bytes:
    """The (downscaled, RGB) query photo as the small JPEG a worker is sent."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=PHOTO_JPEG_QUALITY)
    return buffer.getvalue()


@dataclass(frozen=True)
class QueryEncoding:
    """What the network says about the query photo (or a catalog image used as a query)."""

    model_version_id: int
    code: np.ndarray  # packed bits, uint8
    fc7: np.ndarray  # float32
    category: str = ""
    category_confidence: float | None = None
    category_probs: dict[str, float] = field(default_factory=dict)
    attributes: dict[str, float] = field(default_factory=dict)
    landmarks: list[list[float]] = field(default_factory=list)  # [[x, y, visibility], ...] in [0, 1]
    keypoints: bytes | None = None  # catalog.geometry.pack()ed local features; None when not extracted
    # Where the items are in the photo (inference.localise): [x0, y0, x1, y1, score] in fractions of the photo, best
    # first; empty when the version's export has no activation map
    item_boxes: list[list[float]] = field(default_factory=list)
    item_fused: bool = False  # the encoding mixes the whole photo with its best item box (SEARCH_ITEM_FUSION)


def predictions(encoding: Encoding, index: int, label_space: LabelSpace) -> dict[str, Any]:
    """The per-image predictions of an Encoding, as stored on an embedding and shown in explanations."""
    result: dict[str, Any] = {"category": "", "category_confidence": None, "attributes": {}, "landmarks": []}
    if encoding.category_probs is not None and label_space.categories:
        probs = encoding.category_probs[index]
        best = int(np.argmax(probs))
        result["category"] = label_space.categories[best]
        result["category_confidence"] = float(probs[best])
    if encoding.attribute_probs is not None and label_space.attributes:
        result["attributes"] = {
            name: round(float(p), 4)
            for name, p in zip(label_space.attributes, encoding.attribute_probs[index])
            if p >= ATTRIBUTE_REPORT_THRESHOLD
        }
    if encoding.landmarks is not None:
        visibility = (
            encoding.visibility[index] if encoding.visibility is not None else np.ones(len(encoding.landmarks[index]))
        )
        result["landmarks"] = [
            [round(float(x), 4), round(float(y), 4), round(float(v), 4)]
            for (x, y), v in zip(encoding.landmarks[index], visibility)
        ]
    return result


def query_encoding(
    encoding: Encoding,
    *,
    label_space: LabelSpace,
    model_version_id: int,
    keypoints: bytes | None = None,
    item_boxes: Sequence[ItemBox] = (),
    item_fused: bool = False,
) -> QueryEncoding:
    """The first image of an Encoding as the search's query (`keypoints`: its packed local features, if any;
    `item_boxes`: where its items are, inference.localise.encode_with_item)."""
    category_probs = {}
    if encoding.category_probs is not None and label_space.categories:
        order = np.argsort(-encoding.category_probs[0])[:CATEGORY_TOP]
        category_probs = {label_space.categories[i]: float(encoding.category_probs[0][i]) for i in order}
    return QueryEncoding(
        model_version_id=model_version_id,
        code=np.asarray(encoding.codes[0], np.uint8),
        fc7=np.asarray(encoding.fc7[0], np.float32),
        category_probs=category_probs,
        keypoints=keypoints,
        item_boxes=[box.as_row() for box in item_boxes],
        item_fused=item_fused,
        **predictions(encoding, 0, label_space),
    )


def encoding_to_message(query: QueryEncoding) -> dict[str, Any]:
    """A worker's answer for one encoded query photo, as plain JSON."""
    return {
        "model_version_id": query.model_version_id,
        "bits": packed_bitstring(query.code, len(query.code) * 8),
        "fc7": [float(x) for x in np.asarray(query.fc7).reshape(-1)],
        "category": query.category,
        "category_confidence": query.category_confidence,
        "attributes": dict(query.attributes),
        "landmarks": [list(point) for point in query.landmarks],
        "category_probs": dict(query.category_probs),
        "keypoints": None if query.keypoints is None else base64.b64encode(query.keypoints).decode("ascii"),
        "item_boxes": [list(box) for box in query.item_boxes],
        "item_fused": query.item_fused,
    }


def encoding_from_message(message: dict[str, Any]) -> QueryEncoding:
    return QueryEncoding(
        model_version_id=int(message["model_version_id"]),
        code=bitstring_pack(message["bits"]),
        fc7=np.asarray(message["fc7"], np.float32),
        category=message.get("category") or "",
        category_confidence=message.get("category_confidence"),
        category_probs=dict(message.get("category_probs") or {}),
        attributes=dict(message.get("attributes") or {}),
        landmarks=[list(point) for point in message.get("landmarks") or []],
        keypoints=base64.b64decode(message["keypoints"]) if message.get("keypoints") else None,
        item_boxes=[[float(v) for v in box] for box in message.get("item_boxes") or []],
        item_fused=bool(message.get("item_fused")),
    )
