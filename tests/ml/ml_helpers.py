"""Tiny models and records for the ML tests: random init, 32 px, a few thousand parameters."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from workers.ml.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from workers.ml.encoder import Encoder
from workers.ml.heads import heads_module
from workers.ml.model import FashionNet, FashionNetConfig
from workers.ml.preprocess import preprocess_batch
from workers.ml.records import LabelSpace, Record
from workers.ml.training import preprocessing_for

TINY_BACKBONE = "test_efficientnet"  # timm's own test model: same structure as EfficientNet, 82k params
DEEPFASHION_FIXTURES = Path(__file__).parent / "fixtures" / "deepfashion"  # tiny data in the benchmarks' formats
DEEPFASHION_INSHOP = DEEPFASHION_FIXTURES / "inshop"
LABELS = LabelSpace(categories=("a", "b", "c"), attributes=("red", "striped", "long"), num_landmarks=4)


def tiny_config(**overrides) -> FashionNetConfig:
    fields = {
        "backbone": TINY_BACKBONE,
        "packaged_weights": False,
        "input_size": 32,
        "num_landmarks": LABELS.num_landmarks,
        "num_categories": len(LABELS.categories),
        "num_attributes": len(LABELS.attributes),
        "local_channels": 8,
        "fc6_global_dim": 32,
        "fc6_local_dim": 16,
        "fc7_dim": 32,
        "code_bits": 32,
    }
    fields.update(overrides)
    return FashionNetConfig(**fields)


def save_tiny_checkpoint(path: Path, *, seed: int = 0, spread_codes: bool = False, **overrides) -> Path:
    """A randomly initialised tiny FashionNet saved as a self-describing checkpoint.

    At random init the tiny network gives nearly every image the same code, which is useless for comparing
    codes between runtimes; `spread_codes` centres the hash layer on sample images and scales it up.
    """
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    labels = LABELS if config.num_landmarks else LabelSpace(categories=LABELS.categories)
    model = FashionNet(config).eval()
    if spread_codes:
        rng = np.random.default_rng(seed)
        images = [random_image(rng, (24 + i, 40 - i)) for i in range(16)]
        sample, _ = preprocess_batch(images, preprocessing_for(config))
        with torch.no_grad():
            model.hash.weight.mul_(30.0)
            model.hash.bias.sub_(model(sample).hash_logits.mean(dim=0))
    state = model.state_dict()
    return save_checkpoint(
        build_checkpoint(
            kind="fashionnet",
            model_config=config.to_dict(),
            label_space=labels.to_dict(),
            preprocessing=preprocessing_for(config).to_dict(),
            code_bits=config.code_bits,
            fc7_dim=config.fc7_dim,
            state_dict=state,
            metrics={"note": "random"},
        ),
        path,
    )


def random_image(rng: np.random.Generator, size: tuple[int, int] = (40, 32), mode: str = "RGB") -> Image.Image:
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def random_records(count: int, *, seed: int = 0, instances: int | None = None, labelled: bool = True) -> list[Record]:
    """Records with every label when `labelled`, none (but an instance id) otherwise."""
    rng = np.random.default_rng(seed)
    instances = instances or count
    records = []
    for i in range(count):
        record = Record(random_image(rng), instance_id=i % instances)
        if labelled:
            record.category = int(rng.integers(len(LABELS.categories)))
            record.attributes = rng.integers(0, 2, len(LABELS.attributes)).astype(np.float32)
            record.landmarks = rng.uniform(0.1, 0.9, (LABELS.num_landmarks, 2)).astype(np.float32)
            record.visibility = (rng.random(LABELS.num_landmarks) > 0.3).astype(np.float32)
        records.append(record)
    return records


def write_idx(path: Path | str, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file, Fashion-MNIST's format (gzipped if the name ends in .gz): what
    workers.ml.datasets.fashion_mnist.read_idx reads."""
    path = Path(path)
    array = np.ascontiguousarray(array, np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as file:
        file.write(header + array.tobytes())


def assert_same_bits(checkpoint, images, actual, expected):
    """Codes agree bit for bit, except where torch's hash logit sits within 4e-4 of zero (activation within 1e-4
    of 0.5: float sums in another order may flip those). Also checks the codes are not all alike, which would
    make the comparison meaningless."""
    batch, _ = preprocess_batch(images, Encoder.load(checkpoint).preprocessing)
    with torch.no_grad():
        logits = heads_module(load_checkpoint(checkpoint))(batch)["hash_logits"].numpy()
    settled = np.abs(logits) > 4e-4
    assert settled.mean() > 0.9
    assert np.array_equal(actual.bits[settled], expected.bits[settled])
    assert np.array_equal(np.unpackbits(actual.codes, axis=1).astype(bool), actual.bits)
    if len(images) > 2:
        assert len({code.tobytes() for code in expected.codes}) > len(images) // 2, "codes barely differ"
