"""Train FashionNet on CPU: P x K instance batches, mixed labels, resumable, deterministic from a seed.

    python -m workers.ml.train --config cfg.json          # cfg.json: a TrainConfig as JSON
    train(TrainConfig(...), progress=callback)            # from a Celery task -> path of the final checkpoint

Output directory:
    last.pt         resumable state after the latest finished epoch (model, optimizer, scheduler, epoch, rng)
    model.pt        the final self-describing checkpoint for Encoder.load (no optimizer state)
    metrics.jsonl   one JSON object per epoch: mean loss parts, learning rate, seconds, validation metrics

Determinism: every batch is built from its own seed (seed, epoch, batch index), so a run resumed from
last.pt sees exactly the batches the uninterrupted run would have seen, whichever process builds them.
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from workers.ml.backbone import IMAGENET_MEAN, IMAGENET_STD, PACKAGED_BACKBONE, PACKAGED_MEAN, PACKAGED_STD
from workers.ml.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from workers.ml.losses import LossWeights, MultiTaskLoss
from workers.ml.model import FashionNet, FashionNetConfig
from workers.ml.preprocess import Preprocessing, preprocess
from workers.ml.records import LabelSpace, Record, collate

LOG_EVERY_STEPS = 20  # progress callback / bar refresh cadence: often enough for a dashboard, cheap
GRADIENT_CLIP_NORM = 5.0  # batch-hard mining occasionally produces a spike; clipping keeps Adam calm
WARMUP_FRACTION = 0.03  # linear warm-up: the new heads start random on top of a pretrained backbone


class InstanceDataset(Protocol):
    """What the trainer needs: instance ids and a way to draw a (possibly augmented) view of one."""

    label_space: LabelSpace

    def instance_ids(self) -> np.ndarray: ...

    def view(self, instance_id: int, rng: np.random.Generator) -> Record: ...


class AugmentedRecords:
    """Records grouped by instance; a view is a random image of the instance passed through `augment`.

    With one image per instance (Fashion-MNIST, the renderer) positives are augmented copies of it; with
    several (a shop catalog, DeepFashion) they are different photos of the product, augmented too.
    """

    def __init__(
        self,
        records: Sequence[Record],
        label_space: LabelSpace,
        augment: Callable[[Record, np.random.Generator], Record] | None = None,
    ) -> None:
        self.records = records
        self.label_space = label_space
        self.augment = augment
        groups: dict[int, list[int]] = defaultdict(list)
        for index, record in enumerate(records):
            if record.instance_id < 0:
                raise ValueError("training records need an instance id (product identity)")
            groups[record.instance_id].append(index)
        self.groups = dict(groups)
        self._ids = np.array(sorted(self.groups), dtype=np.int64)

    def instance_ids(self) -> np.ndarray:
        return self._ids

    def view(self, instance_id: int, rng: np.random.Generator) -> Record:
        members = self.groups[int(instance_id)]
        record = self.records[members[int(rng.integers(len(members)))]]
        return self.augment(record, rng) if self.augment is not None else record


def shopper_augment(strength: str) -> Callable[[Record, np.random.Generator], Record]:
    """The data side's shopper-view augmentation at a named strength."""
    from workers.ml.augment import shopper_view

    def augment(record: Record, rng: np.random.Generator) -> Record:
        return shopper_view(record, rng, strength)

    return augment


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
    lr: float = 2e-3
    backbone_lr_scale: float = 0.3  # pretrained layers move slower than the new heads
    weight_decay: float = 1e-4
    seed: int = 0
    num_threads: int = 2
    loader_workers: int = 1  # augmentation runs beside the training step; 0 = in the training process
    resume: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**data)


# ---------------------------------------------------------------------------------------------- batches


class _BatchSource(torch.utils.data.Dataset):
    """Item b of epoch e = one whole P x K batch, built from seed (seed, e, b): order-independent."""

    def __init__(self, data: InstanceDataset, config: TrainConfig, prep: Preprocessing, epoch: int) -> None:
        self.data = data
        self.config = config
        self.prep = prep
        self.epoch = epoch
        ids = data.instance_ids()
        order = np.random.default_rng([config.seed, epoch, 0]).permutation(len(ids))
        self.ids = ids[order]
        p = config.instances_per_batch
        full_batches = max(1, len(ids) // p)
        self.length = config.steps_per_epoch or full_batches

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.config.seed, self.epoch, index + 1])
        p = self.config.instances_per_batch
        start = (index * p) % max(1, len(self.ids) - p + 1)
        chosen = self.ids[start : start + p]
        samples = []
        for instance_id in chosen:
            for _ in range(self.config.views_per_instance):
                samples.append(prepare_sample(self.data.view(int(instance_id), rng), self.prep))
        return collate(samples, self.data.label_space)


def prepare_sample(record: Record, prep: Preprocessing) -> tuple[torch.Tensor, Record]:
    """Letterbox the image and move landmark targets into the input square's coordinates."""
    tensor, box = preprocess(record.image, prep)
    if record.landmarks is not None:
        record = replace(record, landmarks=box.to_input(record.landmarks))
    return tensor, record


def _batches(source: _BatchSource, workers: int):
    loader = torch.utils.data.DataLoader(
        source,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )
    yield from loader


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


def _attribute_frequency(data: InstanceDataset, rng: np.random.Generator, samples: int = 512) -> torch.Tensor | None:
    """Estimate how often each attribute is on, from a sample of views (drives the weighted BCE)."""
    if not data.label_space.attributes:
        return None
    ids = data.instance_ids()
    rows = [data.view(int(i), rng).attributes for i in rng.choice(ids, min(samples, len(ids)), replace=False)]
    rows = [r for r in rows if r is not None]
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
    dataset: InstanceDataset | None = None,
    validate: Callable[[FashionNet, Preprocessing], dict] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> Path:
    """Run (or resume) training and return the path of the final checkpoint (`<out_dir>/model.pt`).

    `dataset` overrides `config.dataset` (the Django side passes an exported catalog); `validate` is called
    after every epoch and its dict lands in metrics.jsonl; `progress` receives a dict every few steps
    (epoch, step, steps, loss, ...) for a dashboard.
    """
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    torch.set_num_threads(config.num_threads)
    _seed_everything(config.seed)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if dataset is None:
        dataset, default_validate = build_dataset(config.dataset, seed=config.seed)
        validate = validate or default_validate
    label_space = dataset.label_space
    model_config = build_model_config(config, label_space)
    prep = preprocessing_for(model_config)
    model = FashionNet(model_config).to(memory_format=torch.channels_last)
    criterion = MultiTaskLoss(
        LossWeights.from_dict(config.loss_weights) if config.loss_weights else LossWeights(),
        _attribute_frequency(dataset, np.random.default_rng(config.seed)),
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
    steps_per_epoch = len(_BatchSource(dataset, config, prep, 0))
    total_steps = steps_per_epoch * config.epochs
    warmup = max(1, int(total_steps * WARMUP_FRACTION))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)

    start_epoch = 0
    resume_path = out_dir / "last.pt"
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
        source = _BatchSource(dataset, config, prep, epoch)
        bar = tqdm(
            _batches(source, config.loader_workers),
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


def build_dataset(spec: dict, *, seed: int) -> tuple[InstanceDataset, Callable | None]:
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
