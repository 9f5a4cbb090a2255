"""The shopper's photo on its way to the `search` queue and its encoding on the way back, both ends in one place.

Celery's JSON serializer carries no bytes, so the validated photo travels as base64 text; the worker answers with
plain JSON (the version, the code as pgvector bit text, fc7 and the network's predictions), which the web process
reads back as a QueryEncoding. The web side (catalog.search via catalog.dispatch) and the worker side
(workers.pipelines.query_encode) both encode and decode through these functions, so the two cannot drift apart.
When the search verifies geometrically, the worker also extracts the photo's local features (catalog.geometry) and
returns them packed, as base64 text (~15 KB): the web process never extracts them itself.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from catalog.codes import bits_to_bitstring, bitstring_pack


def photo_to_message(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def photo_from_message(text: str) -> bytes:
    return base64.b64decode(text)


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


def encoding_to_message(
    *,
    model_version_id: int,
    bits: np.ndarray,
    fc7: np.ndarray,
    category: str = "",
    category_confidence: float | None = None,
    category_probs: dict[str, float] | None = None,
    attributes: dict[str, float] | None = None,
    landmarks: Sequence[Sequence[float]] = (),
    keypoints: bytes | None = None,
) -> dict[str, Any]:
    """The worker's answer for one encoded query photo (`bits`: one 0/1 per code bit)."""
    return {
        "model_version_id": model_version_id,
        "bits": bits_to_bitstring(bits),
        "fc7": [float(x) for x in np.asarray(fc7).reshape(-1)],
        "category": category,
        "category_confidence": category_confidence,
        "attributes": dict(attributes or {}),
        "landmarks": [list(point) for point in landmarks],
        "category_probs": dict(category_probs or {}),
        "keypoints": None if keypoints is None else base64.b64encode(keypoints).decode("ascii"),
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
    )
