"""Encoder: batch-encode PIL images into a named `Encoding`, with an exported network run by ONNX Runtime.

    encoder = Encoder.load("var/models/v3.onnx", num_threads=1)   # once per process
    encoding = encoder.encode(images)                               # cheap, repeatable
    encoding.codes   # (N, B/8) uint8, np.packbits big-endian: bit 0 = MSB of byte 0 (pgvector's order)

The workers' Encoder (workers.ml.encoder) is this class with torch constructors on top (a checkpoint, a network in
training): preprocessing, batching, the bits rule and the Encoding exist once, here. Calls to `encode` are
serialised by a lock, so one Encoder can be shared by the threads of a process.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from inference.checkpoint import LabelSpace
from inference.localise import ItemBox, item_boxes
from inference.preprocess import Letterbox, Preprocessing, preprocess_batch

DEFAULT_BATCH_SIZE = 64  # large enough to amortise per-call overhead, small enough to stay in cache
# Every head an Encoding carries, in this order; a model without a head (no landmarks, say) lacks that one.
HEAD_NAMES = (
    "hash_logits", "fc7", "category_probs", "attribute_probs", "landmarks", "visibility", "activation_map",
)  # fmt: skip


@dataclass(frozen=True)
class Encoding:
    """Per-image outputs for N images, row i for images[i]. Optional heads are None when the model lacks them."""

    bits: np.ndarray  # (N, B) bool; bit = hash activation > 0.5
    codes: np.ndarray  # (N, B/8) uint8 = np.packbits(bits, axis=1), big-endian within each byte
    fc7: np.ndarray  # (N, D) float32, L2-normalised: compare with exact L2
    category_probs: np.ndarray | None  # (N, C) float32, rows sum to 1
    attribute_probs: np.ndarray | None  # (N, A) float32, independent sigmoids
    landmarks: np.ndarray | None  # (N, K, 2) float32, x/y in [0, 1] of the *original* image
    visibility: np.ndarray | None  # (N, K) float32 probabilities
    hash_logits: np.ndarray | None = None  # (N, B) float32: the projections whose signs are the bits (for fusion)
    # Per image, its item boxes, best first (inference.localise, from the activation map); None: the export has no
    # activation map (made before maps were exported)
    item_boxes: tuple[tuple[ItemBox, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.bits)


class Network(Protocol):
    """What Encoder needs from a model: a preprocessed (N, 3, S, S) float32 batch -> network_result's dict
    (landmarks in input units)."""

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray | None]: ...


def network_result(heads: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """Head arrays -> what an Encoder's network returns: bits instead of hash logits, None for the absent heads.

    A bit is set where the sigmoid activation exceeds 0.5, i.e. where the logit is positive; comparing the logit
    is exact, while a float32 sigmoid rounds logits within ~1e-7 of zero to exactly 0.5.
    """
    return {"bits": heads["hash_logits"] > 0, **{name: heads.get(name) for name in HEAD_NAMES}}


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """(N, B) bool -> (N, B/8) uint8, big-endian within each byte. B must be a multiple of 8."""
    bits = np.asarray(bits, dtype=bool)
    if bits.ndim != 2 or bits.shape[1] % 8:
        raise ValueError(f"need (N, B) bits with B a multiple of 8, got shape {bits.shape}")
    return np.packbits(bits, axis=1)


class Encoder:
    def __init__(self, checkpoint_meta: dict, network: Network, path: Path | None = None) -> None:
        """`checkpoint_meta`: a checkpoint's metadata (workers.ml.checkpoint.checkpoint_metadata: no weights)."""
        self.checkpoint_meta = checkpoint_meta
        self.preprocessing = Preprocessing.from_dict(checkpoint_meta["preprocessing"])
        self._network = network
        self._path = path
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, *, num_threads: int | None = None) -> Encoder:
        """An ONNX export of a version (workers.ml.export), run by ONNX Runtime on `num_threads` intra-op threads."""
        if Path(path).suffix != ".onnx":
            raise ValueError(f"{path}: without torch only ONNX exports (.onnx) load; a checkpoint needs workers.ml")
        from inference.onnx_runtime import OnnxNetwork  # onnxruntime is loaded by the first encoder only

        network = OnnxNetwork(path, num_threads=num_threads)
        return cls(network.checkpoint_metadata, network, Path(path))

    @property
    def network(self) -> Network:
        """The network alone: a preprocessed batch in, its heads out (what `manage.py bench_encode` times)."""
        return self._network

    @property
    def code_bits(self) -> int:
        return int(self.checkpoint_meta["code_bits"])

    @property
    def fc7_dim(self) -> int:
        return int(self.checkpoint_meta["fc7_dim"])

    @property
    def label_space(self) -> LabelSpace:
        return LabelSpace.from_dict(self.checkpoint_meta["label_space"])

    @property
    def metrics(self) -> dict:
        return dict(self.checkpoint_meta.get("metrics", {}))

    @property
    def version_info(self) -> dict:
        """What a ModelVersion row records about where these encodings came from."""
        meta = self.checkpoint_meta
        return {
            "kind": meta["kind"],
            "format_version": meta["format_version"],
            "created_at": meta["created_at"],
            "backbone": meta["model_config"].get("backbone"),
            "code_bits": self.code_bits,
            "fc7_dim": self.fc7_dim,
            "input_size": self.preprocessing.input_size,
            "path": str(self._path) if self._path else None,
        }

    def encode(
        self,
        images: Sequence[Image.Image],
        batch_size: int = DEFAULT_BATCH_SIZE,
        *,
        flip: bool = False,
        boxes: bool = False,
    ) -> Encoding:
        """Encode PIL images (any mode, any size) into one Encoding, in input order. With `flip` (a query-side
        option), each image's fc7 is the normalised mean of its own and its mirror image's; the other heads are the
        image's own. With `boxes`, each image's item boxes (inference.localise) where the network has an activation
        map (a query photo's; a catalog's embedding does not need them)."""
        if flip:
            mirrored = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
            both = self.encode([*images, *mirrored], batch_size=batch_size, boxes=boxes)
            own = {name: None if value is None else value[: len(images)] for name, value in vars(both).items()}
            # (the mirror images' boxes are dropped with their rows: each image keeps its own)
            mean = both.fc7[: len(images)] + both.fc7[len(images) :]
            mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
            return Encoding(**{**own, "fc7": mean.astype(np.float32)})
        parts: list[dict[str, np.ndarray | None]] = []
        found: list[tuple[ItemBox, ...]] = []
        has_maps = False
        with self._lock:
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                batch, letterboxes = preprocess_batch(chunk, self.preprocessing)
                result = self._network(batch)
                if result["landmarks"] is not None:
                    result["landmarks"] = _landmarks_to_original(result["landmarks"], letterboxes)
                maps = result.pop("activation_map", None)
                if boxes and maps is not None:
                    # a tuple of per-image box lists is no array: kept apart from the heads concatenated below
                    found.extend(tuple(item_boxes(m, box)) for m, box in zip(maps, letterboxes))
                    has_maps = True
                parts.append(result)
        if not parts:
            return self._empty()
        merged = {
            key: (np.concatenate([p[key] for p in parts]) if parts[0][key] is not None else None) for key in parts[0]
        }
        bits, fc7 = merged["bits"], merged["fc7"]
        assert bits is not None and fc7 is not None  # every network returns both
        return Encoding(
            bits=bits.astype(bool),
            codes=pack_bits(bits),
            fc7=fc7.astype(np.float32),
            category_probs=_float32(merged["category_probs"]),
            attribute_probs=_float32(merged["attribute_probs"]),
            landmarks=_float32(merged["landmarks"]),
            visibility=_float32(merged["visibility"]),
            hash_logits=_float32(merged["hash_logits"]),
            item_boxes=tuple(found) if has_maps else None,
        )

    def _empty(self) -> Encoding:
        labels = self.label_space
        k = labels.num_landmarks if self.checkpoint_meta["kind"] == "fashionnet" else 0
        return Encoding(
            bits=np.zeros((0, self.code_bits), bool),
            codes=np.zeros((0, self.code_bits // 8), np.uint8),
            fc7=np.zeros((0, self.fc7_dim), np.float32),
            category_probs=np.zeros((0, len(labels.categories)), np.float32) if labels.categories else None,
            attribute_probs=np.zeros((0, len(labels.attributes)), np.float32)
            if labels.attributes and self.checkpoint_meta["kind"] == "fashionnet"
            else None,
            landmarks=np.zeros((0, k, 2), np.float32) if k else None,
            visibility=np.zeros((0, k), np.float32) if k else None,
        )


def _float32(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else array.astype(np.float32)


def _landmarks_to_original(points: np.ndarray, boxes: list[Letterbox]) -> np.ndarray:
    return np.stack([box.to_original(p) for p, box in zip(points, boxes)]).clip(0.0, 1.0)
