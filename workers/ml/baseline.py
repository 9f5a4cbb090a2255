"""Version 0: a shop that has never trained still searches well.

The packaged ImageNet EfficientNet-Lite0 at its native 224 px, its last feature maps aggregated by GeM
(generalised mean, Radenović et al., TPAMI 2018), L2-normalised; PCA fitted on a random sample of the shop's own
catalog gives fc7, and ITQ (iterative quantization, Gong & Lazebnik, CVPR 2011) rotates the top PCA components so
that their signs lose as little as possible: those signs are the code bits. An optional nearest-class-mean
classifier predicts the category when the catalog has categories. Fitting 1-3k images (and exporting
the result to ONNX) takes one to three minutes on 2 cores.

The result is an ordinary checkpoint of kind "baseline": `Encoder.load` returns the same `Encoding` as for a
trained network (no attributes or landmarks).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from workers.ml.backbone import PACKAGED_BACKBONE, PACKAGED_MEAN, PACKAGED_STD, create_pooled_model, packaged_weights
from workers.ml.checkpoint import build_checkpoint, save_checkpoint
from workers.ml.preprocess import Preprocessing, preprocess_batch
from workers.ml.records import LabelSpace

# Chosen on the held-out benchmark's validation split (docs/benchmarks.md): R@1 on held-out shopper photos rose
# with the input size (112 px 0.07, 160 px 0.14, 224 px 0.15; the backbone was trained at 224), GeM beat average
# pooling, and PCA whitening lost at every shrinkage tried, so fc7 is plain PCA.
BASELINE_BACKBONE = PACKAGED_BACKBONE
BASELINE_SCALES = (1.0,)
BASELINE_POOLING = "gem"
GEM_POWER = 3.0  # Radenović et al.'s fixed p: between average (p=1) and max pooling, favouring strong activations
ITQ_ITERATIONS = 50  # Gong & Lazebnik: the loss has flattened well before 50
CLASS_MEAN_TEMPERATURE = 20.0  # cosine similarities in [-1, 1] -> softmax that is decisive but not one-hot
FEATURE_BATCH_SIZE = 64
MIN_SAMPLES = 2  # PCA needs at least two images to find a direction


def baseline_input_size(*, backbone: str = BASELINE_BACKBONE, input_size: int | None = None) -> int:
    """The input size a recipe asks for, else its backbone's native resolution (224 px for lite0). Only backbones
    whose ImageNet weights ship in a package qualify: anything else is a ValueError."""
    return int(input_size or packaged_weights(backbone).input_size)


def pooled_descriptor(
    backbone: nn.Module, images: torch.Tensor, pooling: str = BASELINE_POOLING, scales: Sequence[float] = (1.0,)
) -> torch.Tensor:
    """The backbone's last feature maps aggregated into one L2-normalised vector per image: the one definition
    the fit and the fitted network (BaselineNetwork) share. With several `scales` (factors of the input size, the
    input being the largest), the image is also resized inside the network and the scales' normalised vectors are
    averaged (multi-scale descriptor, Radenović et al.)."""
    return descriptor_and_maps(backbone, images, pooling, scales)[0]


def descriptor_and_maps(
    backbone: nn.Module, images: torch.Tensor, pooling: str = BASELINE_POOLING, scales: Sequence[float] = (1.0,)
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pooled_descriptor`, and the last feature maps of the first scale (the item boxes are read from them)."""
    total: torch.Tensor | None = None
    first_maps: torch.Tensor | None = None
    for scale in scales:
        scaled = images
        if scale != 1.0:
            side = (round(images.shape[2] * scale), round(images.shape[3] * scale))
            scaled = F.interpolate(images, size=side, mode="bilinear", align_corners=False)
        maps = backbone.forward_features(scaled)  # type: ignore[operator]  # every timm model has it
        first_maps = maps if first_maps is None else first_maps
        vector = pool_maps(maps, pooling)
        total = vector if total is None else total + vector
    if total is None or first_maps is None:
        raise ValueError("need at least one scale")
    return F.normalize(total, dim=1), first_maps


def pool_maps(maps: torch.Tensor, pooling: str = BASELINE_POOLING) -> torch.Tensor:
    """(N, C, h, w) feature maps -> one L2-normalised (N, C) vector per image."""
    if pooling == "gem":
        pooled = maps.clamp(min=1e-6).pow(GEM_POWER).mean(dim=(2, 3)).pow(1.0 / GEM_POWER)
    elif pooling == "gap":
        pooled = maps.mean(dim=(2, 3))
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return F.normalize(pooled, dim=1)


def extract_features(
    model: torch.nn.Module,
    images: Sequence[Image.Image],
    prep: Preprocessing,
    batch_size: int = FEATURE_BATCH_SIZE,
    pooling: str = BASELINE_POOLING,
    scales: Sequence[float] = (1.0,),
) -> np.ndarray:
    """Pooled backbone features, L2-normalised, (N, F) float32."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch, _ = preprocess_batch(images[start : start + batch_size], prep)
            chunks.append(
                pooled_descriptor(model, batch.contiguous(memory_format=torch.channels_last), pooling, scales).numpy()
            )
    return np.concatenate(chunks).astype(np.float32)


def itq_rotation(projected: np.ndarray, iterations: int = ITQ_ITERATIONS, seed: int = 0) -> np.ndarray:
    """Orthogonal R (k, k) minimising ||sign(V R) - V R||_F for zero-centred V (N, k)."""
    k = projected.shape[1]
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((k, k)))
    for _ in range(iterations):
        codes = np.where(projected @ rotation >= 0, 1.0, -1.0)
        u, _, vt = np.linalg.svd(projected.T @ codes)  # Procrustes: R = U W^T for V^T B = U S W^T
        rotation = u @ vt
    return rotation


def fit_baseline(
    images: Sequence[Image.Image],
    *,
    out_path: str | Path,
    categories: Sequence[str | None] | None = None,
    code_bits: int = 256,
    fc7_dim: int = 256,
    input_size: int | None = None,
    pooling: str = BASELINE_POOLING,
    backbone: str = BASELINE_BACKBONE,
    scales: Sequence[float] = BASELINE_SCALES,
    seed: int = 0,
    num_threads: int | None = None,
) -> Path:
    """Fit PCA + ITQ (+ class means) on catalog images and write a "baseline" checkpoint to `out_path`.

    fc7_dim is clamped to what the sample allows (at most N - 1 and the feature width); the checkpoint records
    the actual width. If fewer than `code_bits` PCA directions exist, the extra bits are signs of seeded random
    projections of fc7 (LSH), so every code still has `code_bits` bits.
    """
    if len(images) < MIN_SAMPLES:
        raise ValueError(f"need at least {MIN_SAMPLES} images to fit a baseline, got {len(images)}")
    if not (32 <= code_bits <= 256 and code_bits % 8 == 0):
        raise ValueError(f"code_bits must be a multiple of 8 in [32, 256], got {code_bits}")
    input_size = baseline_input_size(backbone=backbone, input_size=input_size)
    scales = tuple(float(scale) for scale in scales)
    if not scales or not all(0.25 <= scale <= 1.0 for scale in scales):
        raise ValueError(f"scales are factors of input_size in [0.25, 1], got {scales}")
    if categories is not None and len(categories) != len(images):
        raise ValueError("categories must align with images")
    if num_threads:
        torch.set_num_threads(num_threads)

    prep = Preprocessing(input_size, PACKAGED_MEAN, PACKAGED_STD)
    model = create_pooled_model(backbone, packaged_weights=True).eval().to(memory_format=torch.channels_last)
    features = extract_features(model, images, prep, pooling=pooling, scales=scales)

    mean = features.mean(axis=0)
    centred = features - mean
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    rank = min(len(images) - 1, features.shape[1])
    fc7_dim = min(fc7_dim, rank)
    components = vt[: max(fc7_dim, min(code_bits, rank))].T  # (F, k) — codes may use more than fc7's width
    projected = centred @ components

    itq_dims = min(code_bits, components.shape[1])
    rotation = itq_rotation(projected[:, :itq_dims], seed=seed)
    hash_projection = components[:, :itq_dims] @ rotation  # (F, itq_dims)
    if itq_dims < code_bits:
        rng = np.random.default_rng(seed + 1)
        extra = components @ rng.standard_normal((components.shape[1], code_bits - itq_dims))
        hash_projection = np.concatenate([hash_projection, extra], axis=1)

    fc7_projection = components[:, :fc7_dim]
    label_space = LabelSpace()
    state = {
        "feature_mean": torch.from_numpy(mean.astype(np.float32)),
        "fc7_projection": torch.from_numpy(fc7_projection.astype(np.float32)),
        "hash_projection": torch.from_numpy(hash_projection.astype(np.float32)),
    }
    if categories is not None:
        names = sorted({c for c in categories if c})
        if names:
            label_space = LabelSpace(categories=tuple(names))
            fc7 = _normalise(projected[:, :fc7_dim])
            means = np.zeros((len(names), fc7_dim))
            for index, name in enumerate(names):
                members = [i for i, c in enumerate(categories) if c == name]
                means[index] = fc7[members].mean(axis=0)
            state["class_means"] = torch.from_numpy(_normalise(means).astype(np.float32))
    state.update({f"backbone.{key}": value for key, value in model.state_dict().items()})

    checkpoint = build_checkpoint(
        kind="baseline",
        model_config={
            "backbone": backbone,
            "pooling": pooling,
            "input_size": input_size,
            "scales": list(scales),
            "fit_samples": len(images),
            "itq_dims": int(itq_dims),
        },
        label_space=label_space.to_dict(),
        preprocessing=prep.to_dict(),
        code_bits=code_bits,
        fc7_dim=fc7_dim,
        state_dict=state,
    )
    return save_checkpoint(checkpoint, out_path)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class BaselineNetwork(nn.Module):
    """Version 0 as a network (what the Encoder runs, and what exports to ONNX): pooled backbone features,
    centred, projected to fc7 (PCA) and to code bits (ITQ), plus nearest-class-mean category probabilities.

    Returns the Encoder's heads by name (inference.encoder.HEAD_NAMES); the projections are the hash logits: a bit
    is set where its projection is positive, the same rule as FashionNet's hash layer.
    """

    def __init__(self, checkpoint: dict) -> None:
        import timm

        super().__init__()
        state = checkpoint["state_dict"]
        self.backbone = timm.create_model(checkpoint["model_config"]["backbone"], pretrained=False)
        self.backbone.reset_classifier(0)  # type: ignore[operator]
        backbone_state = {key[len("backbone.") :]: value for key, value in state.items() if key.startswith("backbone.")}
        self.backbone.load_state_dict(backbone_state, strict=True)
        self.feature_mean: torch.Tensor
        self.fc7_projection: torch.Tensor
        self.hash_projection: torch.Tensor
        self.register_buffer("feature_mean", state["feature_mean"])
        self.register_buffer("fc7_projection", state["fc7_projection"])
        self.register_buffer("hash_projection", state["hash_projection"])
        self.class_means: torch.Tensor | None
        self.register_buffer("class_means", state.get("class_means"))
        self.pooling = str(checkpoint["model_config"].get("pooling", "gap"))  # versions fitted before GeM: "gap"
        self.scales = tuple(float(s) for s in checkpoint["model_config"].get("scales", (1.0,)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        descriptor, maps = descriptor_and_maps(self.backbone, images, self.pooling, self.scales)
        features = descriptor - self.feature_mean
        fc7 = F.normalize(features @ self.fc7_projection, dim=1)
        heads = {"hash_logits": features @ self.hash_projection, "fc7": fc7}
        if self.class_means is not None:
            heads["category_probs"] = (CLASS_MEAN_TEMPERATURE * fc7 @ self.class_means.T).softmax(dim=1)
        # SCDA (Wei et al., TIP 2017): the channel mean (SCDA sums; the mean keeps float32 exact enough for the
        # export check) of the last feature maps is high where the object is; the item boxes of a query photo are
        # read from it (inference.localise), at no cost beyond this mean.
        heads["activation_map"] = maps.mean(dim=1)
        return heads
