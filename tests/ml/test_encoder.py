import threading

import numpy as np
import pytest
from PIL import Image

from tests.ml.ml_helpers import LABELS, random_image, save_tiny_checkpoint
from workers.ml.checkpoint import load_checkpoint, save_checkpoint
from workers.ml.encoder import Encoder, Encoding


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("encoder") / "model.pt")


def _images(count=5, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(40, 32), (32, 64), (20, 20), (50, 30), (33, 33)]
    modes = ["RGB", "L", "RGBA", "RGB", "P"]
    return [random_image(rng, sizes[i % 5], modes[i % 5]) for i in range(count)]


def test_encoding_fields_shapes_and_dtypes(checkpoint_path):
    encoder = Encoder.load(checkpoint_path)
    encoding = encoder.encode(_images(5), batch_size=2)  # several batches, mixed sizes and modes
    assert isinstance(encoding, Encoding) and len(encoding) == 5
    assert encoding.bits.shape == (5, 32) and encoding.bits.dtype == bool
    assert encoding.codes.shape == (5, 4) and encoding.codes.dtype == np.uint8
    assert np.array_equal(np.unpackbits(encoding.codes, axis=1).astype(bool), encoding.bits)
    assert encoding.fc7.shape == (5, 32) and encoding.fc7.dtype == np.float32
    assert np.allclose(np.linalg.norm(encoding.fc7, axis=1), 1, atol=1e-5)
    assert encoding.category_probs.shape == (5, 3) and np.allclose(encoding.category_probs.sum(1), 1, atol=1e-5)
    assert encoding.attribute_probs.shape == (5, 3)
    assert encoding.landmarks.shape == (5, 4, 2) and encoding.landmarks.dtype == np.float32
    assert encoding.landmarks.min() >= 0 and encoding.landmarks.max() <= 1
    assert encoding.visibility.shape == (5, 4)
    assert encoder.code_bits == 32 and encoder.fc7_dim == 32 and encoder.label_space == LABELS
    assert encoder.version_info["kind"] == "fashionnet" and encoder.version_info["input_size"] == 32


def test_encoding_is_deterministic_and_batch_independent(checkpoint_path):
    encoder = Encoder.load(checkpoint_path)
    images = _images(5)
    one_by_one = encoder.encode(images, batch_size=1)
    all_at_once = encoder.encode(images, batch_size=8)
    assert np.array_equal(one_by_one.codes, all_at_once.codes)
    assert np.allclose(one_by_one.fc7, all_at_once.fc7, atol=1e-5)


def test_checkpoint_round_trips_to_identical_encodings(checkpoint_path, tmp_path):
    images = _images(4, seed=3)
    first = Encoder.load(checkpoint_path).encode(images)
    copy = tmp_path / "copy.pt"
    save_checkpoint(load_checkpoint(checkpoint_path), copy)
    second = Encoder.load(copy).encode(images)
    for field in ("bits", "codes", "fc7", "category_probs", "attribute_probs", "landmarks", "visibility"):
        assert np.array_equal(getattr(first, field), getattr(second, field)), field


def test_empty_input_and_thread_sharing(checkpoint_path):
    encoder = Encoder.load(checkpoint_path)
    empty = encoder.encode([])
    assert empty.codes.shape == (0, 4) and empty.fc7.shape == (0, 32) and empty.landmarks.shape == (0, 4, 2)

    expected = encoder.encode(_images(3)).codes
    results = []
    threads = [threading.Thread(target=lambda: results.append(encoder.encode(_images(3)).codes)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and all(np.array_equal(r, expected) for r in results)


def test_landmarks_are_reported_in_original_image_coordinates(checkpoint_path):
    # A wide image is letterboxed with bands above and below; mapped back, landmarks still land in [0, 1]
    # and a point at the input's vertical centre maps to the original's vertical centre.
    from workers.ml.preprocess import Preprocessing, letterbox

    prep = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    _, box = letterbox(Image.new("RGB", (64, 32)), prep)
    assert box.scale_x == 1.0 and box.scale_y == 0.5 and box.offset_y == 0.25
    assert np.allclose(box.to_original(np.array([[0.5, 0.5]])), [[0.5, 0.5]])
    assert np.allclose(box.to_input(np.array([[0.0, 0.0]])), [[0.0, 0.25]])


def test_flip_averages_fc7_with_the_mirror_image_and_keeps_the_other_heads(checkpoint_path):
    encoder = Encoder.load(checkpoint_path)
    images = [image.convert("RGB") for image in _images(3, seed=4)]
    mirrored = [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
    own, mirror = encoder.encode(images), encoder.encode(mirrored)

    flipped = encoder.encode(images, flip=True)

    mean = own.fc7 + mirror.fc7
    assert np.allclose(flipped.fc7, mean / np.linalg.norm(mean, axis=1, keepdims=True), atol=1e-5)
    assert not np.allclose(flipped.fc7, own.fc7, atol=1e-3)  # random images are not symmetric
    assert len(flipped) == 3 and np.array_equal(flipped.codes, own.codes)
    assert np.allclose(flipped.landmarks, own.landmarks, atol=1e-5)
