import numpy as np
import torch
from PIL import Image, ImageDraw

from workers.ml.baseline import fit_baseline, itq_rotation
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
