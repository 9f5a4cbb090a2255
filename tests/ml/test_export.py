"""ONNX export: the exported graph, run by ONNX Runtime through the Encoder, gives the torch Encoding."""

import os
import time

import numpy as np
import onnx
import pytest

from inference.onnx_runtime import OnnxNetwork
from tests.ml.ml_helpers import LABELS, assert_same_bits, random_image, save_tiny_checkpoint
from workers.ml.baseline import fit_baseline
from workers.ml.encoder import Encoder
from workers.ml.export import export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint = save_tiny_checkpoint(folder / "model.pt", spread_codes=True)
    return checkpoint, export(checkpoint)


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    return [random_image(rng, (24 + 7 * (i % 5), 40 - 3 * (i % 4))) for i in range(count)]


@pytest.mark.parametrize("count, batch_size", [(1, 64), (7, 3), (70, 64)])  # the batch axis is dynamic
def test_onnx_encoder_matches_torch(exported, count, batch_size):
    checkpoint, onnx_path = exported
    images = _images(count)
    expected = Encoder.load(checkpoint).encode(images, batch_size=batch_size)
    actual = Encoder.load(onnx_path, num_threads=1).encode(images, batch_size=batch_size)
    assert_same_bits(checkpoint, images, actual, expected)
    assert np.allclose(actual.fc7, expected.fc7, atol=1e-5)
    for head in ("category_probs", "attribute_probs", "landmarks", "visibility"):
        assert getattr(actual, head).dtype == np.float32
        assert np.allclose(getattr(actual, head), getattr(expected, head), atol=1e-5), head


def test_onnx_file_is_self_describing(exported):
    checkpoint, onnx_path = exported
    assert onnx_path == checkpoint.with_suffix(".onnx")
    encoder = Encoder.load(onnx_path)
    assert encoder.code_bits == 32 and encoder.fc7_dim == 32 and encoder.label_space == LABELS
    assert encoder.preprocessing == Encoder.load(checkpoint).preprocessing
    assert encoder.version_info["path"] == str(onnx_path) and encoder.version_info["kind"] == "fashionnet"
    assert "state_dict" not in OnnxNetwork(onnx_path).checkpoint_metadata


def test_model_without_landmarks_exports_only_its_heads(tmp_path):
    onnx_path = export(save_tiny_checkpoint(tmp_path / "plain.pt", num_landmarks=0, num_attributes=0))
    names = [output.name for output in onnx.load(str(onnx_path)).graph.output]
    assert names == ["hash_logits", "fc7", "category_probs", "activation_map"]  # the map: item boxes
    encoding = Encoder.load(onnx_path).encode(_images(3))
    assert encoding.landmarks is None and encoding.visibility is None and encoding.attribute_probs is None
    assert encoding.category_probs.shape == (3, len(LABELS.categories))


def test_version_zero_exports_too(tmp_path):
    images = _images(12)
    categories = ["a", "b", "c"] * 4
    baseline = fit_baseline(images, categories=categories, code_bits=32, input_size=32, out_path=tmp_path / "v0.pt")
    onnx_path = export(baseline)
    expected = Encoder.load(baseline).encode(images, batch_size=5)
    actual = Encoder.load(onnx_path).encode(images, batch_size=5)
    assert_same_bits(baseline, images, actual, expected)
    assert np.allclose(actual.fc7, expected.fc7, atol=1e-5)
    # class means at temperature 20 magnify fc7's last-digit differences twentyfold
    assert np.allclose(actual.category_probs, expected.category_probs, atol=1e-4)
    assert actual.landmarks is None and actual.attribute_probs is None
    assert Encoder.load(onnx_path).version_info["kind"] == "baseline"
    # the exported activation map is torch's (at 32 px it is 1 x 1: flat, so no item boxes; at 224 px,
    # tests/ml/test_localise.py)
    boxed = Encoder.load(onnx_path).encode(images[:4], boxes=True)
    assert boxed.item_boxes == Encoder.load(baseline).encode(images[:4], boxes=True).item_boxes == ((),) * 4


def test_an_onnx_file_from_elsewhere_is_refused(tmp_path, exported):
    _, onnx_path = exported
    foreign = onnx.load(str(onnx_path))
    del foreign.metadata_props[:]
    onnx.save(foreign, str(tmp_path / "foreign.onnx"))
    with pytest.raises(ValueError, match="not exported by workers.ml.export"):
        Encoder.load(tmp_path / "foreign.onnx")


def test_temp_files_of_killed_exports_are_cleaned_up(tmp_path, exported):
    checkpoint, _ = exported
    out = tmp_path / "model.onnx"
    abandoned, in_progress = tmp_path / "model.onnx.1234.tmp", tmp_path / "model.onnx.5678.tmp"
    abandoned.write_bytes(b"half")
    in_progress.write_bytes(b"half")
    two_hours_ago = time.time() - 7200
    os.utime(abandoned, (two_hours_ago, two_hours_ago))
    export(checkpoint, out)
    assert out.exists() and not abandoned.exists()
    assert in_progress.exists()  # recent: it may belong to another worker's export that is still running
