"""Train FashionNet on CPU: P x K instance batches, mixed labels, resumable, deterministic from a seed.

    python -m workers.ml.train --config cfg.json          # cfg.json: a TrainConfig as JSON
    train(TrainConfig(...), progress=callback)            # from a Celery task -> path of the final checkpoint

Output directory:
    last.pt         resumable state after the latest finished epoch (model, optimizer, scheduler, epoch, rng)
    model.pt        the final self-describing checkpoint for Encoder.load (no optimizer state)
    metrics.jsonl   one JSON object per epoch: mean loss parts, learning rate, seconds, validation metrics

Batches come from the data side's P x K sampler (workers.ml.sampler): P products, K views each, the first
view the clean catalog photo and the others shopper views. Every batch is a pure function of (seed, epoch),
so a run resumed from last.pt sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from workers.ml.backbone import IMAGENET_MEAN, IMAGENET_STD, PACKAGED_BACKBONE, PACKAGED_MEAN, PACKAGED_STD
from workers.ml.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from workers.ml.datasets.torch_dataset import RecordDataset, instance_ids
from workers.ml.losses import LossWeights, MultiTaskLoss
from workers.ml.model import FashionNet, FashionNetConfig
from workers.ml.preprocess import Preprocessing
from workers.ml.records import LabelSpace, Record, collate
from workers.ml.sampler import PKBatchSampler

LOG_EVERY_STEPS = 20  # progress callback / bar refresh cadence: often enough for a dashboard, cheap
GRADIENT_CLIP_NORM = 5.0  # batch-hard mining occasionally produces a spike; clipping keeps Adam calm
WARMUP_FRACTION = 0.03  # linear warm-up: the new heads start random on top of a pretrained backbone


@dataclass
class TrainConfig:
    """A training run, JSON-serialisable (the dashboard stores it with the run)."""

    out_dir: str = "var/runs/default"
    dataset: dict = field(default_factory=lambda: {"name": "fashion-mnist"})
    model: dict = field(default_factory=dict)  # FashionNetConfig fields; label sizes are filled from the data
    loss_weights: dict = field(default_factory=dict)  # LossWeights fields
    epochs: int = 5
    steps_per_epoch: int = 0  # 0 = one pass over the instances (P instances per batch)
    instances_per_batch: int = 32  # P
    views_per_instance: int = 2  # K
    clean_views: int = 1  # of the K views, this many are the unaugmented catalog photo (what queries match)
    augment: str = "strong"  # shopper-view strength for the other views (workers.ml.augment.STRENGTHS)
    lr: float = 2e-3
    backbone_lr_scale: float = 0.3  # pretrained layers move slower than the new heads
    weight_decay: float = 1e-4
    seed: int = 0
    num_threads: int = 2
    loader_workers: int = 1  # augmentation runs beside the training step; 0 = in the training process
    resume: bool = True
    init_checkpoint: str = ""  # start from this FashionNet checkpoint's weights (fine-tuning, e.g. the active version)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**data)


def epoch_loader(
    records: Sequence[Record], label_space: LabelSpace, config: TrainConfig, prep: Preprocessing, epoch: int
) -> DataLoader:
    """The data side's P x K loader for one epoch; batches are a pure function of (seed, epoch)."""
    dataset = RecordDataset(records, prep, augment=config.augment or None, seed=config.seed)
    sampler = PKBatchSampler(
        instance_ids(records),
        config.instances_per_batch,
        config.views_per_instance,
        seed=config.seed,
        clean_views=config.clean_views,
        batches_per_epoch=config.steps_per_epoch or None,
    )
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=partial(collate, label_space=label_space),
        num_workers=config.loader_workers,
    )


# ---------------------------------------------------------------------------------------------- training


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def preprocessing_for(model_config: FashionNetConfig) -> Preprocessing:
    mean, std = (
        (PACKAGED_MEAN, PACKAGED_STD) if model_config.backbone == PACKAGED_BACKBONE else (IMAGENET_MEAN, IMAGENET_STD)
    )
    return Preprocessing(model_config.input_size, mean, std)


def _attribute_frequency(
    records: Sequence[Record], label_space: LabelSpace, rng: np.random.Generator, samples: int = 512
) -> torch.Tensor | None:
    """Estimate how often each attribute is on, from a sample of records (drives the weighted BCE)."""
    if not label_space.attributes:
        return None
    chosen = rng.choice(len(records), min(samples, len(records)), replace=False)
    rows = [a for a in (records[int(i)].attributes for i in chosen) if a is not None]
    if not rows:
        return None
    return torch.as_tensor(np.mean(rows, axis=0), dtype=torch.float32)


def build_model_config(config: TrainConfig, label_space: LabelSpace) -> FashionNetConfig:
    return FashionNetConfig.from_dict(
        {
            **config.model,
            "num_categories": len(label_space.categories),
            "num_attributes": len(label_space.attributes),
            "num_landmarks": label_space.num_landmarks,
        }
    )


def train(
    config: TrainConfig | dict,
    *,
    records: Sequence[Record] | None = None,
    label_space: LabelSpace | None = None,
    validate: Callable[[FashionNet, Preprocessing], dict] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> Path:
    """Run (or resume) training and return the path of the final checkpoint (`<out_dir>/model.pt`).

    `records` + `label_space` override `config.dataset` (the Django side passes an exported catalog: several
    Records per product share an instance id); `validate(model, prep) -> dict` is called
    after every epoch and its dict lands in metrics.jsonl; `progress` receives a dict every few steps
    (epoch, step, steps, loss, ...) for a dashboard.
    """
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    torch.set_num_threads(config.num_threads)
    _seed_everything(config.seed)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if records is None:
        records, label_space, default_validate = build_dataset(config.dataset, seed=config.seed)
        validate = validate or default_validate
    if label_space is None:
        raise ValueError("pass the label_space of the records")
    model_config = build_model_config(config, label_space)
    prep = preprocessing_for(model_config)
    model = FashionNet(model_config).to(memory_format=torch.channels_last)
    criterion = MultiTaskLoss(
        LossWeights.from_dict(config.loss_weights) if config.loss_weights else LossWeights(),
        _attribute_frequency(records, label_space, np.random.default_rng(config.seed)),
    )

    backbone_params = list(model.backbone.parameters())
    backbone_ids = {id(p) for p in backbone_params}
    head_params = [p for p in model.parameters() if id(p) not in backbone_ids]
    optimizer = torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": config.lr * config.backbone_lr_scale},
            {"params": head_params, "lr": config.lr},
        ],
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = len(epoch_loader(records, label_space, config, prep, 0))
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(total_steps * WARMUP_FRACTION))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    start_epoch = 0
    resume_path = out_dir / "last.pt"
    if config.init_checkpoint and not (config.resume and resume_path.exists()):
        initial = load_checkpoint(config.init_checkpoint)
        if initial["kind"] != "fashionnet":
            raise ValueError(f"init_checkpoint must be a fashionnet checkpoint, not {initial['kind']!r}")
        weights = dict(initial["state_dict"])
        fresh: set[str] = set()
        if weights["hash.weight"].shape != model.hash.weight.shape:
            # a different code length: keep everything up to fc7, start a fresh hash layer on it
            fresh = {"hash.weight", "hash.bias"}
            for key in fresh:
                del weights[key]
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) != fresh:
            raise ValueError(f"init_checkpoint does not fit: missing {missing}, unexpected {unexpected}")
    if config.resume and resume_path.exists():
        state = load_checkpoint(resume_path)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["training"]["optimizer"])
        scheduler.load_state_dict(state["training"]["scheduler"])
        torch.set_rng_state(state["training"]["torch_rng"])
        start_epoch = int(state["training"]["epoch"]) + 1

    metrics_path = out_dir / "metrics.jsonl"
    last_metrics: dict = {}
    for epoch in range(start_epoch, config.epochs):
        model.train()
        started = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        source = epoch_loader(records, label_space, config, prep, epoch)
        bar = tqdm(
            source,
            total=len(source),
            desc=f"epoch {epoch + 1}/{config.epochs}",
            dynamic_ncols=True,
            mininterval=2.0,
        )
        for step, batch in enumerate(bar):
            images = batch["image"].contiguous(memory_format=torch.channels_last)
            output = model(images)
            loss, parts = criterion(output, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP_NORM)
            optimizer.step()
            scheduler.step()
            sums["loss"] += float(loss.detach())
            for name, value in parts.items():
                sums[name] += float(value.detach())
            if step % LOG_EVERY_STEPS == 0 or step == len(source) - 1:
                bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.4f}")
                if progress is not None:
                    progress(
                        {
                            "epoch": epoch,
                            "epochs": config.epochs,
                            "step": step + 1,
                            "steps": len(source),
                            "loss": sums["loss"] / (step + 1),
                        }
                    )
        bar.close()
        epoch_metrics = {
            "epoch": epoch,
            "seconds": round(time.perf_counter() - started, 2),
            "lr": optimizer.param_groups[1]["lr"],
            **{name: value / len(source) for name, value in sums.items()},
        }
        if validate is not None:
            model.eval()
            with torch.inference_mode():
                epoch_metrics["validation"] = validate(model, prep)
        with metrics_path.open("a") as log:
            log.write(json.dumps(epoch_metrics) + "\n")
        last_metrics = epoch_metrics
        save_checkpoint(
            _checkpoint(model, model_config, label_space, prep, epoch_metrics, config)
            | {
                "training": {
                    "epoch": epoch,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "config": config.to_dict(),
                }
            },
            resume_path,
        )
        if progress is not None:  # after last.pt is written, so "done" means "survives a restart"
            progress({"epoch": epoch, "epochs": config.epochs, "done": True, "metrics": epoch_metrics})

    if not last_metrics and metrics_path.exists():  # resumed after the last epoch had already finished
        lines = metrics_path.read_text().strip().splitlines()
        last_metrics = json.loads(lines[-1]) if lines else {}
    final = _checkpoint(model, model_config, label_space, prep, last_metrics, config)
    return save_checkpoint(final, out_dir / "model.pt")


def _checkpoint(
    model: FashionNet,
    model_config: FashionNetConfig,
    label_space: LabelSpace,
    prep: Preprocessing,
    metrics: dict,
    config: TrainConfig,
) -> dict:
    return build_checkpoint(
        kind="fashionnet",
        model_config=model_config.to_dict(),
        label_space=label_space.to_dict(),
        preprocessing=prep.to_dict(),
        code_bits=model_config.code_bits,
        fc7_dim=model_config.fc7_dim,
        state_dict=model.state_dict(),
        metrics={**metrics, "train_config": config.to_dict()},
    )


# ---------------------------------------------------------------------------------------------- datasets


def build_dataset(spec: dict, *, seed: int) -> tuple[Sequence[Record], LabelSpace, Callable | None]:
    """A training dataset (and its per-epoch validation) from a JSON spec; see workers.ml.benchmark."""
    from workers.ml.benchmark import training_data

    return training_data(spec, seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="TrainConfig as JSON")
    parser.add_argument("--out-dir", help="override config.out_dir")
    args = parser.parse_args(argv)
    data = json.loads(args.config.read_text())
    if args.out_dir:
        data["out_dir"] = args.out_dir
    path = train(TrainConfig.from_dict(data))
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
