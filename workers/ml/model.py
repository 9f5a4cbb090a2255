"""FashionNet-style multi-task network (the design and why: docs/architecture.md).

    image ─ timm backbone ─┬─ last feature map ── global pooling ── fc6_global ─┐
                           └─ local feature map ─┬─ landmark branch (xy + vis)   │
                                                 └─ landmark pooling ── fc6_local┴─ concat ─ fc7 ─┬─ category
                                                                                                   ├─ attributes
                                                                                                   ├─ embedding
                                                                                                   └─ hash (sigmoid)

fc7 is what the fine stage of the search compares with exact L2, so it is the metric space: it is
L2-normalised and the metric losses act on it (or on a separate embedding head if one is configured). The hash
layer is a sigmoid latent layer on top of fc7 (Lin et al., CVPRW 2015); a bit is set where its activation
exceeds 0.5.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from workers.ml.backbone import PACKAGED_BACKBONE, create_feature_extractor, create_global_head

POOLINGS = ("gap", "gem", "spoc", "mac", "rmac", "netvlad")
LANDMARK_MODES = ("heatmap", "regression")
GEM_INITIAL_P = 3.0  # Radenović et al.: p=3 is a good start between mean (1) and max (inf)
NETVLAD_CLUSTERS = 8  # small: the VLAD vector is C*clusters wide and fc6 has to digest it
RMAC_LEVELS = 3  # region scales as in Tolias et al.
LANDMARK_POOL_RADIUS = 1.0  # sample a 3x3 neighbourhood of local-map cells around each landmark


@dataclass
class FashionNetConfig:
    """Everything needed to rebuild the network; plain JSON types only (it is stored in checkpoints)."""

    backbone: str = PACKAGED_BACKBONE
    packaged_weights: bool = True  # start from the ImageNet weights shipped in a pip package
    input_size: int = 64
    pooling: str = "gem"
    num_landmarks: int = 0
    landmark_mode: str = "heatmap"
    local_channels: int = 64  # width of the local feature map shared by landmarks and landmark pooling
    local_stride: int = 16  # stride of the local map; 8 gives small inputs a finer landmark grid
    fc6_global_dim: int = 512
    fc6_local_dim: int = 256
    fc7_dim: int = 512
    embedding_dim: int = 0  # 0 = the metric embedding is fc7 itself (what the rerank stores)
    code_bits: int = 64
    num_categories: int = 0
    num_attributes: int = 0
    dropout: float = 0.1
    # The backbone's own conv head (1x1 conv + BN) before global pooling, and the pooled vector L2-normalised:
    # version 0's descriptor (workers.ml.baseline.pooled_descriptor), so a network can start as version 0
    # (workers.ml.warm_start). The landmark branch keeps reading the last stage's map.
    global_head: bool = False
    # The landmark and visibility losses train the backbone too (FashionNet's joint training). False: the landmark
    # branch learns on the backbone's features as they are (stop-gradient), so labels the shop's catalog does not
    # have cannot pull its retrieval features away from its own photos.
    landmarks_tune_backbone: bool = True

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.landmark_mode not in LANDMARK_MODES:
            raise ValueError(f"landmark_mode must be one of {LANDMARK_MODES}, got {self.landmark_mode!r}")
        if not (32 <= self.code_bits <= 256 and self.code_bits % 8 == 0):
            raise ValueError(f"code_bits must be a multiple of 8 in [32, 256], got {self.code_bits}")
        if self.packaged_weights and self.backbone != PACKAGED_BACKBONE:
            raise ValueError(f"packaged_weights needs backbone={PACKAGED_BACKBONE!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FashionNetConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


class FashionNetOutput(NamedTuple):
    """Named network outputs; optional heads are None when the config has no labels for them."""

    fc7: torch.Tensor  # (N, D) L2-normalised: the vector the fine stage compares
    embedding: torch.Tensor  # (N, E) L2-normalised metric embedding (fc7 itself unless configured)
    hash_logits: torch.Tensor  # (N, B) pre-sigmoid hash layer
    hash_probs: torch.Tensor  # (N, B) sigmoid activations; bit = activation > 0.5
    category_logits: torch.Tensor | None  # (N, C)
    attribute_logits: torch.Tensor | None  # (N, A)
    landmarks: torch.Tensor | None  # (N, K, 2) x/y in [0, 1] of the input image
    visibility_logits: torch.Tensor | None  # (N, K)
    # (N, h, w) channel mean of the last feature maps (SCDA): where the item is, read by inference.localise
    activation_map: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- pooling


class GeM(nn.Module):
    """Generalised mean pooling with a learnable exponent (Radenović et al.)."""

    def __init__(self, p: float = GEM_INITIAL_P, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(p))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class RMAC(nn.Module):
    """Regional max-pooling (Tolias et al.): L2-normalised max over square regions at several scales, summed."""

    def __init__(self, levels: int = RMAC_LEVELS) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        total = F.normalize(x.amax(dim=(2, 3)), dim=1)
        for level in range(2, self.levels + 1):
            side = max(1, math.ceil(2 * min(h, w) / (level + 1)))
            starts_y = torch.linspace(0, h - side, level).round().long().tolist()
            starts_x = torch.linspace(0, w - side, level).round().long().tolist()
            for y in starts_y:
                for xx in starts_x:
                    region = x[:, :, y : y + side, xx : xx + side].amax(dim=(2, 3))
                    total = total + F.normalize(region, dim=1)
        return total


class NetVLAD(nn.Module):
    """NetVLAD (Arandjelović et al.): soft-assigned residuals to learned centroids, intra- and L2-normalised."""

    def __init__(self, channels: int, clusters: int = NETVLAD_CLUSTERS) -> None:
        super().__init__()
        self.assign = nn.Conv2d(channels, clusters, kernel_size=1)
        self.centroids = nn.Parameter(torch.randn(clusters, channels) * 0.1)
        self.out_dim = channels * clusters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, _, _ = x.shape
        soft = self.assign(x).flatten(2).softmax(dim=1)  # (N, K, HW)
        features = x.flatten(2)  # (N, C, HW)
        vlad = torch.einsum("nkh,nch->nkc", soft, features) - soft.sum(dim=2).unsqueeze(2) * self.centroids
        vlad = F.normalize(vlad, dim=2).reshape(n, -1)
        return F.normalize(vlad, dim=1)


def make_pooling(kind: str, channels: int) -> tuple[nn.Module, int]:
    """The pooling module for `kind` and the width of what it returns."""
    if kind == "gap":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), channels
    if kind == "gem":
        return GeM(), channels
    if kind == "spoc":
        return _Lambda(lambda x: x.sum(dim=(2, 3))), channels
    if kind == "mac":
        return _Lambda(lambda x: x.amax(dim=(2, 3))), channels
    if kind == "rmac":
        return RMAC(), channels
    if kind == "netvlad":
        module = NetVLAD(channels)
        return module, module.out_dim
    raise ValueError(f"unknown pooling {kind!r}")


class _Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


# ---------------------------------------------------------------------------------------------- landmarks


def soft_argmax(heatmap_logits: torch.Tensor) -> torch.Tensor:
    """(N, K, H, W) logits -> (N, K, 2) expected x/y in [0, 1], cell centres at (i + 0.5) / size."""
    n, k, h, w = heatmap_logits.shape
    probs = heatmap_logits.flatten(2).softmax(dim=2).reshape(n, k, h, w)
    xs = (torch.arange(w, dtype=probs.dtype, device=probs.device) + 0.5) / w
    ys = (torch.arange(h, dtype=probs.dtype, device=probs.device) + 0.5) / h
    x = (probs.sum(dim=2) * xs).sum(dim=2)
    y = (probs.sum(dim=3) * ys).sum(dim=2)
    return torch.stack([x, y], dim=2)


def landmark_pool(local: torch.Tensor, landmarks: torch.Tensor, visibility: torch.Tensor) -> torch.Tensor:
    """Average local features in a small neighbourhood of each landmark, weighted by its visibility.

    local (N, C, H, W); landmarks (N, K, 2) in [0, 1]; visibility (N, K) in [0, 1] -> (N, K * C).
    """
    n, c, h, w = local.shape
    k = landmarks.shape[1]
    offsets = torch.tensor([-1.0, 0.0, 1.0], device=local.device) * LANDMARK_POOL_RADIUS
    dy, dx = torch.meshgrid(offsets / h * 2, offsets / w * 2, indexing="ij")
    centre = landmarks * 2 - 1  # grid_sample wants [-1, 1]
    grid = centre.unsqueeze(2) + torch.stack([dx.flatten(), dy.flatten()], dim=1)  # (N, K, 9, 2)
    sampled = F.grid_sample(local, grid, mode="bilinear", padding_mode="border", align_corners=False)
    pooled = sampled.mean(dim=3) * visibility.unsqueeze(1)  # (N, C, K)
    return pooled.transpose(1, 2).reshape(n, k * c)


# ---------------------------------------------------------------------------------------------- network


class FashionNet(nn.Module):
    def __init__(self, config: FashionNetConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = create_feature_extractor(config.backbone, packaged_weights=config.packaged_weights)
        feature_info: Any = self.backbone.feature_info  # timm's FeatureInfo; nn.Module's stub types it as Tensor
        channels: list[int] = feature_info.channels()
        reductions: list[int] = feature_info.reduction()
        if config.local_stride not in reductions[:-1]:
            raise ValueError(f"local_stride must be one of {reductions[:-1]} for {config.backbone}")
        self.local_level = reductions.index(config.local_stride)
        last_channels, local_channels_in = channels[-1], channels[self.local_level]

        self.global_head: nn.Sequential | None = None
        pooled_channels = last_channels
        if config.global_head:
            self.global_head = create_global_head(config.backbone, packaged_weights=config.packaged_weights)
            pooled_channels = int(cast(nn.Conv2d, self.global_head[0]).out_channels)
        self.pool, pooled_dim = make_pooling(config.pooling, pooled_channels)
        self.fc6_global = nn.Sequential(
            nn.Linear(pooled_dim, config.fc6_global_dim), nn.BatchNorm1d(config.fc6_global_dim), nn.ReLU()
        )

        k = config.num_landmarks
        fused_dim = config.fc6_global_dim
        if k:
            # Local map at the second-to-last stride, enriched with the upsampled last stage's context.
            self.local = nn.Sequential(
                nn.Conv2d(local_channels_in + last_channels, config.local_channels, 1, bias=False),
                nn.BatchNorm2d(config.local_channels),
                nn.ReLU(),
                nn.Conv2d(config.local_channels, config.local_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(config.local_channels),
                nn.ReLU(),
            )
            if config.landmark_mode == "heatmap":
                self.heatmap = nn.Conv2d(config.local_channels, k, 1)
                self.visibility = nn.Linear(pooled_dim + k, k)
            else:
                self.landmark_regressor = nn.Linear(pooled_dim, k * 2)
                self.visibility = nn.Linear(pooled_dim, k)
            self.fc6_local = nn.Sequential(
                nn.Linear(k * config.local_channels, config.fc6_local_dim),
                nn.BatchNorm1d(config.fc6_local_dim),
                nn.ReLU(),
            )
            fused_dim += config.fc6_local_dim

        self.dropout = nn.Dropout(config.dropout)
        # No ReLU after fc7: it is the metric space and a ReLU would clip half of it.
        self.fc7 = nn.Sequential(nn.Linear(fused_dim, config.fc7_dim), nn.BatchNorm1d(config.fc7_dim))
        self.embedding = nn.Linear(config.fc7_dim, config.embedding_dim) if config.embedding_dim else None
        self.hash = nn.Linear(config.fc7_dim, config.code_bits)
        self.category = nn.Linear(config.fc7_dim, config.num_categories) if config.num_categories else None
        self.attributes = nn.Linear(config.fc7_dim, config.num_attributes) if config.num_attributes else None

    def forward(self, images: torch.Tensor) -> FashionNetOutput:
        feature_maps = self.backbone(images)
        last, local_features = feature_maps[-1], feature_maps[self.local_level]
        if self.global_head is not None:
            pooled = F.normalize(self.pool(self.global_head(last)), dim=1)
        else:
            pooled = self.pool(last)
        fused = [self.fc6_global(pooled)]

        landmarks = visibility_logits = None
        if self.config.num_landmarks:
            seen = (last, local_features, pooled)  # what the landmark branch reads
            if not self.config.landmarks_tune_backbone:
                seen = (last.detach(), local_features.detach(), pooled.detach())
            branch_last, branch_local, branch_pooled = seen
            upsampled = F.interpolate(branch_last, size=branch_local.shape[2:], mode="nearest")
            local = self.local(torch.cat([branch_local, upsampled], dim=1))
            if self.config.landmark_mode == "heatmap":
                heatmaps = self.heatmap(local)
                landmarks = soft_argmax(heatmaps)
                peak = heatmaps.flatten(2).amax(dim=2)  # a confident, sharp peak suggests a visible landmark
                visibility_logits = self.visibility(torch.cat([branch_pooled, peak], dim=1))
            else:
                regressed = self.landmark_regressor(branch_pooled)
                landmarks = torch.sigmoid(regressed).reshape(-1, self.config.num_landmarks, 2)
                visibility_logits = self.visibility(branch_pooled)
            # Pool where the network believes the landmarks are, but do not let the pooling pull them around:
            # their positions are taught by the landmark loss alone.
            weights = torch.sigmoid(visibility_logits).detach()
            fused.append(self.fc6_local(landmark_pool(local, landmarks.detach(), weights)))

        fc7_raw = self.fc7(self.dropout(torch.cat(fused, dim=1)))
        fc7 = F.normalize(fc7_raw, dim=1)
        embedding = F.normalize(self.embedding(fc7_raw), dim=1) if self.embedding is not None else fc7
        hash_logits = self.hash(fc7_raw)
        return FashionNetOutput(
            fc7=fc7,
            embedding=embedding,
            hash_logits=hash_logits,
            hash_probs=torch.sigmoid(hash_logits),
            category_logits=self.category(fc7_raw) if self.category is not None else None,
            attribute_logits=self.attributes(fc7_raw) if self.attributes is not None else None,
            landmarks=landmarks,
            visibility_logits=visibility_logits,
            activation_map=last.mean(dim=1),
        )


__all__ = ["FashionNet", "FashionNetConfig", "FashionNetOutput", "POOLINGS"]
