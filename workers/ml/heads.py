"""The networks the Encoder runs and the ONNX export writes, as "heads modules": a preprocessed image batch in,
the Encoder's heads out, by name (`inference.encoder.HEAD_NAMES`).

Both checkpoint kinds give one: a trained FashionNet wrapped in `FashionNetHeads`, and version 0's
`BaselineNetwork` (workers.ml.baseline), so the torch path and the ONNX export treat both kinds alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from workers.ml.baseline import BaselineNetwork
from workers.ml.model import FashionNet, FashionNetConfig


class FashionNetHeads(nn.Module):
    """A FashionNet whose forward returns the Encoder's heads by name (probabilities, but the hash layer's
    logits: see inference.encoder.network_result); absent heads are left out."""

    def __init__(self, model: FashionNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(images)
        heads = {
            "hash_logits": out.hash_logits,
            "fc7": out.fc7,
            "category_probs": out.category_logits.softmax(1) if out.category_logits is not None else None,
            "attribute_probs": torch.sigmoid(out.attribute_logits) if out.attribute_logits is not None else None,
            "landmarks": out.landmarks,
            "visibility": torch.sigmoid(out.visibility_logits) if out.visibility_logits is not None else None,
            "activation_map": out.activation_map,
        }
        return {name: value for name, value in heads.items() if value is not None}


def _fashionnet_heads(checkpoint: dict) -> nn.Module:
    config = FashionNetConfig.from_dict({**checkpoint["model_config"], "packaged_weights": False})
    model = FashionNet(config)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return FashionNetHeads(model)


# checkpoint kind (workers.ml.checkpoint.KINDS) -> its heads module, built from the checkpoint
HEADS_BY_KIND: dict[str, Callable[[dict], nn.Module]] = {"fashionnet": _fashionnet_heads, "baseline": BaselineNetwork}


def heads_module(checkpoint: dict) -> nn.Module:
    """The torch network of a checkpoint of either kind, in eval mode, returning the Encoder's heads by name."""
    return HEADS_BY_KIND[checkpoint["kind"]](checkpoint).eval()
