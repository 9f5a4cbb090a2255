"""Encoder: load a checkpoint once, then batch-encode PIL images into a named `Encoding`.

    encoder = Encoder.load("var/models/v3.pt", num_threads=1)   # once per worker process
    encoding = encoder.encode(images)                             # cheap, repeatable
    encoding.codes   # (N, B/8) uint8, np.packbits big-endian: bit 0 = MSB of byte 0 (pgvector's order)

Both checkpoint kinds — a trained FashionNet and the untrained "version 0" baseline — give the same Encoding,
and so does either kind exported to ONNX (workers.ml.export) and run by ONNX Runtime (workers.ml.onnx_runtime).
Calls to `encode` are serialised by a lock, so one Encoder can be shared by the threads of a worker process.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from workers.ml.checkpoint import FORMAT_VERSION, checkpoint_metadata, load_checkpoint
from workers.ml.codes import pack_bits
from workers.ml.heads import FashionNetHeads, heads_module, network_result
from workers.ml.model import FashionNet
from workers.ml.preprocess import Letterbox, Preprocessing, preprocess_batch
from workers.ml.records import LabelSpace

DEFAULT_BATCH_SIZE = 64  # large enough to amortise per-call overhead, small enough to stay in cache


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

    def __len__(self) -> int:
        return len(self.bits)


class _Network(Protocol):
    """What Encoder needs from a model: a preprocessed batch -> dict of numpy outputs (landmarks in input units)."""

    def __call__(self, batch: torch.Tensor) -> dict[str, np.ndarray | None]: ...


class _TorchNetwork:
    """A heads module run by torch: inference mode (the Encoder's), channels-last."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval().to(memory_format=torch.channels_last)

    def __call__(self, batch: torch.Tensor) -> dict[str, np.ndarray | None]:
        heads = self.module(batch.contiguous(memory_format=torch.channels_last))
        return network_result({name: value.float().numpy() for name, value in heads.items()})


class Encoder:
    def __init__(self, checkpoint: dict, network: _Network, path: Path | None = None) -> None:
        self.checkpoint_meta = checkpoint_metadata(checkpoint)
        self.preprocessing = Preprocessing.from_dict(checkpoint["preprocessing"])
        self._network = network
        self._path = path
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, *, num_threads: int | None = None) -> Encoder:
        """Load a checkpoint of any kind, or an ONNX export of one (`.onnx`, run by ONNX Runtime).

        `num_threads` pins torch's intra-op threads (process-wide) and ONNX Runtime's.
        """
        if num_threads:
            torch.set_num_threads(num_threads)
        if Path(path).suffix == ".onnx":
            from workers.ml.onnx_runtime import OnnxNetwork  # onnxruntime is loaded only for .onnx files

            network = OnnxNetwork(path, num_threads=num_threads)
            return cls(network.checkpoint_metadata, network, Path(path))
        checkpoint = load_checkpoint(path)
        return cls.from_checkpoint(checkpoint, path=Path(path))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, *, path: Path | None = None) -> Encoder:
        return cls(checkpoint, _TorchNetwork(heads_module(checkpoint)), path)

    @classmethod
    def from_model(cls, model: FashionNet, *, label_space: LabelSpace, preprocessing: Preprocessing) -> Encoder:
        """Wrap a live network (validation during training): puts it in eval mode, shares its weights."""
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": "fashionnet",
            "created_at": "",
            "model_config": model.config.to_dict(),
            "label_space": label_space.to_dict(),
            "preprocessing": preprocessing.to_dict(),
            "code_bits": model.config.code_bits,
            "fc7_dim": model.config.fc7_dim,
        }
        return cls(meta, _TorchNetwork(FashionNetHeads(model)))

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

    def encode(self, images: Sequence[Image.Image], batch_size: int = DEFAULT_BATCH_SIZE) -> Encoding:
        """Encode PIL images (any mode, any size) into one Encoding, in input order."""
        parts: list[dict[str, np.ndarray | None]] = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                batch, boxes = preprocess_batch(chunk, self.preprocessing)
                result = self._network(batch)
                if result["landmarks"] is not None:
                    result["landmarks"] = _landmarks_to_original(result["landmarks"], boxes)
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
