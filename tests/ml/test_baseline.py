import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from workers.ml.baseline import baseline_input_size, fit_baseline, itq_rotation
from workers.ml.encoder import Encoder


def _product_images(count: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """Coloured shapes on white: two categories a backbone can tell apart."""
    rng = np.random.default_rng(seed)
    images, categories = [], []
    for i in range(count):
        image = Image.new("RGB", (48, 48), "white")
        draw = ImageDraw.Draw(image)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = tuple(
            int(v) for v in (rng.integers(4, 14), rng.integers(4, 14), rng.integers(32, 44), rng.integers(32, 44))
        )
        if i % 2:
            draw.ellipse(box, fill=colour)
            categories.append("round")
        else:
            draw.rectangle(box, fill=colour)
            categories.append("square")
        images.append(image)
    return images, categories


def test_itq_rotation_is_orthogonal_and_reduces_quantisation_error():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((300, 8)) @ rng.standard_normal((8, 8))
    data -= data.mean(0)
    rotation = itq_rotation(data)
    assert np.allclose(rotation @ rotation.T, np.eye(8), atol=1e-8)

    def error(r):
        projected = data @ r
        return np.linalg.norm(np.sign(projected) - projected)

    assert error(rotation) < error(np.eye(8))


def test_fit_baseline_and_encode(tmp_path):
    torch.set_num_threads(1)
    images, categories = _product_images(24)
    categories[3] = None  # unknown categories are allowed
    path = fit_baseline(
        images, categories=categories, code_bits=32, fc7_dim=64, input_size=32, out_path=tmp_path / "v0.pt"
    )
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["kind"] == "baseline"
    assert checkpoint["fc7_dim"] == 23  # clamped: 24 images allow at most 23 PCA directions
    encoder = Encoder.load(path)
    assert encoder.label_space.categories == ("round", "square")
    encoding = encoder.encode(images[:6])
    assert encoding.bits.shape == (6, 32) and encoding.codes.shape == (6, 4)
    assert encoding.fc7.shape == (6, 23) and encoding.fc7.dtype == np.float32
    assert encoding.category_probs.shape == (6, 2)
    assert encoding.attribute_probs is None and encoding.landmarks is None and encoding.visibility is None
    assert np.array_equal(encoder.encode(images[:6]).codes, encoding.codes)  # deterministic
    # Catalog images find themselves: every image's nearest fc7 neighbour is itself.
    everything = encoder.encode(images)
    nearest = np.argmax(everything.fc7 @ everything.fc7.T, axis=1)
    assert np.array_equal(nearest, np.arange(len(images)))
    # ITQ fitted on these images balances bits far better than constant codes.
    assert 0.2 < everything.bits.mean() < 0.8


def test_a_multi_scale_baseline_records_its_scales_and_encodes_what_it_fitted(tmp_path):
    torch.set_num_threads(1)
    images, categories = _product_images(16)
    path = fit_baseline(
        images, categories=categories, code_bits=32, fc7_dim=8, input_size=48, scales=[1.0, 0.75],
        out_path=tmp_path / "ms.pt",
    )  # fmt: skip
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["model_config"]["scales"] == [1.0, 0.75] and checkpoint["model_config"]["input_size"] == 48
    single = torch.load(
        fit_baseline(images, code_bits=32, fc7_dim=8, input_size=48, out_path=tmp_path / "one.pt"), weights_only=True
    )
    assert not torch.allclose(checkpoint["state_dict"]["feature_mean"], single["state_dict"]["feature_mean"])
    everything = Encoder.load(path).encode(images)
    assert np.array_equal(np.argmax(everything.fc7 @ everything.fc7.T, axis=1), np.arange(len(images)))


def test_the_baseline_refuses_what_it_cannot_fit(tmp_path):
    images, _ = _product_images(4)
    with pytest.raises(ValueError, match="packaged ImageNet weights exist only for"):
        fit_baseline(images, backbone="resnet18", out_path=tmp_path / "x.pt")
    with pytest.raises(ValueError, match="scales"):
        fit_baseline(images, scales=[1.0, 2.0], out_path=tmp_path / "x.pt")
    assert baseline_input_size() == 224 and baseline_input_size(backbone="tf_efficientnet_lite2") == 260
