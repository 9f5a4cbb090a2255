"""Start a shop's retrain as version 0: a FashionNet whose first forward pass ranks exactly as the version 0 it starts
from, so that training can only move away from version 0, and the run keeps the start when nothing it trains
measures better (workers.ml.training's selection).

Version 0 (workers.ml.baseline) is x = L2(GeM(conv head(backbone))), z = (x - mean) @ P (PCA), fc7 = L2(z), code
bits = sign((x - mean) @ H) (ITQ). FashionNet with `global_head` computes the same x, then
fc6_global = ReLU(BN(Linear(x))) and fc7 = BN(Linear(concat(fc6_global, fc6_local))). The warm start writes

    fc6_global's Linear:  [P^T; -P^T] x + [-P^T mean; P^T mean]   (2 x fc7_dim rows)  -> [z, -z]
    ReLU:                 [max(z, 0), max(-z, 0)]
    fc7's Linear:         [I, -I] (the landmark part 0)                                -> z
    fc6_local's BN:       its scale set to version 0's fc7's (the landmark part then grows at the pace of the rest)
    hash:                 A^T z with P A = H (H lies in P's span), scaled             -> version 0's code signs

and both BatchNorms as identities (running mean 0, running variance 1 - eps, weight 1, bias 0). Their statistics
stay frozen while training (`held_statistics`): in training mode they would whiten fc7 batch by batch, a jump
away from version 0's PCA space that PCA whitening measurably loses (workers.ml.baseline).
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn

from workers.ml.baseline import GEM_POWER
from workers.ml.model import FashionNet, GeM

# The hash logits start at version 0's signs scaled to this standard deviation: near 0 the sigmoid is flat and the
# hash losses (quantization, triplet on the relaxed codes) would first spend their steps growing the scale.
HASH_LOGIT_STD = 2.0
SPAN_TOLERANCE = 1e-3  # relative error allowed when the code projection is re-expressed from fc7


def baseline_model_config(baseline: dict, model: dict) -> dict:
    """FashionNetConfig fields for a network that starts as `baseline` (a "baseline" checkpoint): `model`'s fields
    with version 0's backbone, input size, pooling, fc7 width and code length, and fc6_global twice fc7 wide."""
    config = baseline["model_config"]
    fc7_dim = int(baseline["fc7_dim"])
    return {
        **model,
        "backbone": config["backbone"],
        "packaged_weights": False,  # the weights come from the checkpoint itself
        "input_size": int(config["input_size"]),
        "pooling": str(config.get("pooling", "gap")),
        "global_head": True,
        "fc7_dim": fc7_dim,
        "fc6_global_dim": 2 * fc7_dim,
        "embedding_dim": 0,  # the metric space is fc7, version 0's
        "code_bits": int(baseline["code_bits"]),
    }


@torch.no_grad()
def warm_start_from_baseline(model: FashionNet, baseline: dict, sample: torch.Tensor | None = None) -> None:
    """Make `model` (built from `baseline_model_config`) compute version 0's fc7 and code bits. `sample`: a few
    preprocessed catalog images, to scale the hash logits (HASH_LOGIT_STD); without one they stay unscaled."""
    state = baseline["state_dict"]
    if model.global_head is None:
        raise ValueError("a warm start from version 0 needs global_head (build the model from baseline_model_config)")
    backbone = {key[len("backbone.") :]: value for key, value in state.items() if key.startswith("backbone.")}
    model.backbone.load_state_dict({key: backbone[key] for key in model.backbone.state_dict()}, strict=True)
    model.global_head.load_state_dict(
        {key.replace("conv_head.", "0.", 1).replace("bn2.", "1.", 1): value for key, value in backbone.items()
         if key.startswith(("conv_head.", "bn2."))},
        strict=True,
    )  # fmt: skip
    if isinstance(model.pool, GeM):
        model.pool.p.fill_(GEM_POWER)
    mean = state["feature_mean"].double()
    pca = state["fc7_projection"].double()  # (F, D), orthonormal columns
    codes = state["hash_projection"].double()  # (F, B)
    dim = pca.shape[1]
    if (model.config.fc7_dim, model.config.fc6_global_dim, model.config.code_bits) != (dim, 2 * dim, codes.shape[1]):
        raise ValueError("the model's fc7, fc6_global and code sizes do not match the version 0 it starts from")

    fc6_linear, fc6_norm = cast(nn.Linear, model.fc6_global[0]), model.fc6_global[1]
    fc6_linear.weight.copy_(torch.cat([pca.T, -pca.T]).float())
    fc6_linear.bias.copy_(torch.cat([-(mean @ pca), mean @ pca]).float())
    _identity(fc6_norm)

    fc7_linear, fc7_norm = cast(nn.Linear, model.fc7[0]), model.fc7[1]
    fc7_linear.weight.zero_()
    eye = torch.eye(dim)
    fc7_linear.weight[:, :dim] = eye
    fc7_linear.weight[:, dim : 2 * dim] = -eye
    fc7_linear.bias.zero_()
    _identity(fc7_norm)

    rotation = pca.T @ codes  # (D, B): fc7_raw @ rotation = (x - mean) @ codes, if codes lie in pca's span
    error = torch.linalg.norm(pca @ rotation - codes) / torch.linalg.norm(codes).clamp(min=1e-12)
    if error > SPAN_TOLERANCE:
        raise ValueError(f"version 0's code projection is not in its fc7 span (relative error {float(error):.2g})")
    scale = 1.0
    if sample is not None and len(sample):
        model.eval()
        centred = _pooled(model, sample).double() - mean
        logits = centred @ codes  # version 0's hash logits on the sample
        scale = HASH_LOGIT_STD / float(logits.std().clamp(min=1e-12))
        if model.config.num_landmarks:
            _landmark_part_at_version0_scale(model, float((centred @ pca).pow(2).mean().sqrt()))
    model.hash.weight.copy_((rotation.T * scale).float())
    model.hash.bias.zero_()


def _landmark_part_at_version0_scale(model: FashionNet, rms: float) -> None:
    """fc6_local's output at the scale of version 0's fc7 (`rms`, measured on the sample), not BatchNorm's unit one.

    fc7 starts reading it through zero weights, and AdamW moves every weight by about the learning rate a step
    whatever the gradient's size: at unit scale, against version 0's components of a few hundredths, a few steps
    let an untrained landmark branch's features swamp version 0's fc7 (measured: the golden R@1 of a run with
    rendered products mixed in fell from 0.40 to 0.32 in its first epoch). At version 0's scale the landmark part
    enters fc7 at the pace of the rest of it."""
    norm = model.fc6_local[1]
    assert isinstance(norm, nn.BatchNorm1d)
    norm.weight.fill_(rms)
    norm.bias.zero_()


def _pooled(model: FashionNet, images: torch.Tensor) -> torch.Tensor:
    last = model.backbone(images)[-1]
    assert model.global_head is not None
    return torch.nn.functional.normalize(model.pool(model.global_head(last)), dim=1)


def _identity(norm: nn.Module) -> None:
    assert isinstance(norm, nn.BatchNorm1d)
    norm.running_mean.zero_()  # type: ignore[union-attr]
    norm.running_var.fill_(1.0 - norm.eps)  # type: ignore[union-attr]
    norm.weight.fill_(1.0)
    norm.bias.zero_()


def freeze_backbone(model: FashionNet, trainable_blocks: int) -> None:
    """Train only the backbone's last `trainable_blocks` blocks (and the conv head); < 0: the whole backbone."""
    if trainable_blocks < 0:
        return
    blocks = cast(nn.Sequential, model.backbone.blocks)  # timm EfficientNet features: conv_stem, bn1, blocks
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(False)
    for block in list(blocks)[len(blocks) - trainable_blocks :] if trainable_blocks else []:
        for parameter in block.parameters():
            parameter.requires_grad_(True)


def held_statistics(model: FashionNet, *, warm_started: bool) -> list[nn.Module]:
    """The BatchNorms whose running statistics stay as they are while the rest trains: the pretrained backbone's
    and its conv head's (P x K batches of one shop are a poor estimate of them), and, after a warm start, fc6's
    and fc7's identities. Training puts them back in eval mode after every model.train()."""
    modules: list[nn.Module] = [model.backbone]
    if model.global_head is not None:
        modules.append(model.global_head)
    if warm_started:
        modules += [model.fc6_global[1], model.fc7[1]]
    return [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def fit_sample(count: int, total: int, seed: int) -> np.ndarray:
    """Indices of `count` of `total` items, seeded: the catalog images a start of version 0 is fitted on."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(count, total), replace=False))
