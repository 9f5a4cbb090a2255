"""Encoder: load a checkpoint once, preprocess, batch-encode PIL images into a named `Encoding`.

    encoder = Encoder.load("var/models/v3.pt", num_threads=1)   # once per worker process
    encoding = encoder.encode(images)                             # cheap, repeatable
    encoding.codes   # (N, B/8) uint8, np.packbits big-endian: bit 0 = MSB of byte 0 (pgvector's order)

Both checkpoint kinds — a trained FashionNet and the untrained "version 0" baseline — give the same Encoding,
and so does either kind exported to ONNX (workers.ml.export) and run by ONNX Runtime. The encoding itself
(preprocessing, batching, the bits rule, the Encoding) is inference.encoder's, which a web process runs without
torch on an export; this class adds what needs torch: checkpoints and live networks.
Calls to `encode` are serialised by a lock, so one Encoder can be shared by the threads of a worker process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from inference import encoder as _inference
from inference.encoder import Encoding as Encoding
from workers.ml.checkpoint import FORMAT_VERSION, checkpoint_metadata, load_checkpoint
from workers.ml.heads import FashionNetHeads, heads_module
from workers.ml.model import FashionNet
from workers.ml.preprocess import Preprocessing
from workers.ml.records import LabelSpace

DEFAULT_BATCH_SIZE = _inference.DEFAULT_BATCH_SIZE


class _TorchNetwork:
    """A heads module run by torch: inference mode, channels-last."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module.eval().to(memory_format=torch.channels_last)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray | None]:
        with torch.inference_mode():
            heads = self.module(torch.from_numpy(batch).contiguous(memory_format=torch.channels_last))
            return _inference.network_result({name: value.float().numpy() for name, value in heads.items()})


class Encoder(_inference.Encoder):
    @classmethod
    def load(cls, path: str | Path, *, num_threads: int | None = None) -> Encoder:
        """Load a checkpoint of any kind, or an ONNX export of one (`.onnx`, run by ONNX Runtime).

        `num_threads` pins torch's intra-op threads (process-wide) and ONNX Runtime's.
        """
        if num_threads:
            torch.set_num_threads(num_threads)
        if Path(path).suffix == ".onnx":
            return super().load(path, num_threads=num_threads)  # type: ignore[return-value]  # cls: this class
        return cls.from_checkpoint(load_checkpoint(path), path=Path(path))

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, *, path: Path | None = None) -> Encoder:
        return cls(checkpoint_metadata(checkpoint), _TorchNetwork(heads_module(checkpoint)), path)

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
