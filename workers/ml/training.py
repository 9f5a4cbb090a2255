"""Train FashionNet on CPU: P x K instance batches, mixed labels, resumable, deterministic from a seed.

    train(TrainConfig.from_overrides({"epochs": 3}), progress=callback)  # -> path of the final checkpoint
    python -m workers.ml.train --config cfg.json                         # the command line (workers.ml.train)

Output directory:
    last.pt         resumable state after the latest finished epoch (model, optimizer, scheduler, epoch, rng)
    model.pt        the final self-describing checkpoint for Encoder.load (no optimizer state)
    metrics.jsonl   one JSON object per epoch: mean loss parts, learning rate, seconds, validation metrics

Batches come from the data side's P x K sampler (workers.ml.sampler): P products, K views each, the first
view the clean catalog photo and the others shopper views. Every batch is a pure function of (seed, epoch),
so a run resumed from last.pt sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import random
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from workers.ml.backbone import IMAGENET_MEAN, IMAGENET_STD, PACKAGED_BACKBONE, PACKAGED_MEAN, PACKAGED_STD
from workers.ml.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from workers.ml.datasets.factory import TrainingData, build_dataset
from workers.ml.datasets.torch_dataset import RecordDataset, instance_ids
from workers.ml.losses import LossWeights, MultiTaskLoss
from workers.ml.model import FashionNet, FashionNetConfig
from workers.ml.preprocess import Preprocessing
from workers.ml.records import LabelSpace, Record, collate
from workers.ml.sampler import PKBatchSampler

LOG_EVERY_STEPS = 20  # progress bar refresh cadence (the progress callback hears of every step)
GRADIENT_CLIP_NORM = 5.0  # batch-hard mining occasionally produces a spike; clipping keeps Adam calm
WARMUP_FRACTION = 0.03  # linear warm-up: the new heads start random on top of a pretrained backbone
LAST_CHECKPOINT = "last.pt"
FINAL_CHECKPOINT = "model.pt"
METRICS_LOG = "metrics.jsonl"
# TrainConfig fields whose keys are independent settings: overrides are merged into them key by key
MERGED_FIELDS = ("model", "loss_weights")


@dataclass
class TrainConfig:
    """A training run, JSON-serialisable (the dashboard stores it with the run). The one home of the training
    defaults: a caller that keeps only what differs from them resolves the whole config with `from_overrides`."""

    out_dir: str = "var/runs/default"
    dataset: dict = field(default_factory=lambda: {"name": "fashion-mnist"})  # a spec for datasets.factory
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

    @classmethod
    def from_overrides(cls, *overrides: Mapping) -> TrainConfig:
        """The defaults with each mapping laid over them in turn, later ones winning: e.g. a recipe, then an
        admin's changes. `model` and `loss_weights` are merged key by key; any other field (`dataset` too: its
        keys depend on its name) is replaced whole. Unknown fields raise TypeError, as in `from_dict`."""
        merged = cls().to_dict()
        for layer in overrides:
            for key, value in layer.items():
                if key in MERGED_FIELDS and isinstance(value, Mapping):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
        return cls.from_dict(copy.deepcopy(merged))


def loader_workers_usable(requested: int) -> int:
    """The loader processes this process may start: `requested`, or 0 inside a daemonic process.

    A daemonic process may not have children (multiprocessing refuses with "daemonic processes are not allowed
    to have children"), and a Celery prefork pool child is one: the dashboard's default run must train there, so
    augmentation then runs in the training process itself (slower per step, same batches: every batch is a pure
    function of (seed, epoch), whichever process builds it)."""
    if requested > 0 and multiprocessing.current_process().daemon:
        return 0
    return requested


class TrainingCancelled(Exception):
    """Raised by a progress callback to stop training between two steps (train() lets it through)."""


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
        num_workers=loader_workers_usable(config.loader_workers),
    )


def preprocessing_for(model_config: FashionNetConfig) -> Preprocessing:
    mean, std = (
        (PACKAGED_MEAN, PACKAGED_STD) if model_config.backbone == PACKAGED_BACKBONE else (IMAGENET_MEAN, IMAGENET_STD)
    )
    return Preprocessing(model_config.input_size, mean, std)


def build_model_config(config: TrainConfig, label_space: LabelSpace) -> FashionNetConfig:
    return FashionNetConfig.from_dict(
        {
            **config.model,
            "num_categories": len(label_space.categories),
            "num_attributes": len(label_space.attributes),
            "num_landmarks": label_space.num_landmarks,
        }
    )


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The per-epoch metrics a run wrote (every epoch of it, resumed ones included), oldest first."""
    path = Path(out_dir) / METRICS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- training


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
    after every epoch and its dict lands in metrics.jsonl; `progress` receives a dict after every step
    (epoch, step, steps, loss, ...) and at the end of every epoch, for a dashboard; it may raise TrainingCancelled
    to stop the run there (last.pt then holds the last finished epoch, and no model.pt is written).
    """
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    torch.set_num_threads(config.num_threads)
    _seed_everything(config.seed)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _build_run(config, out_dir, _training_data(config, records, label_space, validate))
    for epoch in range(_first_epoch(run), config.epochs):
        metrics = _run_epoch(run, epoch, progress)
        if run.data.validate is not None:
            metrics["validation"] = _validate(run)
        _save_epoch(run, epoch, metrics)
        if progress is not None:  # after last.pt is written, so "done" means "survives a restart"
            progress({"epoch": epoch, "epochs": config.epochs, "done": True, "metrics": metrics})
    return _save_final(run)


def train_stages(stages: Sequence[dict]) -> list[Path]:
    """Train TrainConfig dicts in turn, each later stage fine-tuning the previous stage's final checkpoint;
    returns every stage's checkpoint."""
    checkpoints = [train(TrainConfig.from_dict(stages[0]))]
    for stage in stages[1:]:
        checkpoints.append(train(TrainConfig.from_dict({**stage, "init_checkpoint": str(checkpoints[-1])})))
    return checkpoints


@dataclass
class _Run:
    """Everything one training run works with, built once before its first epoch."""

    config: TrainConfig
    out_dir: Path
    data: TrainingData
    model_config: FashionNetConfig
    prep: Preprocessing
    model: FashionNet
    criterion: MultiTaskLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _training_data(
    config: TrainConfig, records: Sequence[Record] | None, label_space: LabelSpace | None, validate: Callable | None
) -> TrainingData:
    """The caller's records (with their label space), or else the ones `config.dataset` names."""
    if records is None:
        data = build_dataset(config.dataset)
        return data._replace(validate=validate or data.validate)
    if label_space is None:
        raise ValueError("pass the label_space of the records")
    return TrainingData(records, label_space, validate)


def _build_run(config: TrainConfig, out_dir: Path, data: TrainingData) -> _Run:
    """The network (fresh heads on the pretrained backbone), its loss, optimizer and learning-rate schedule."""
    model_config = build_model_config(config, data.label_space)
    prep = preprocessing_for(model_config)
    model = FashionNet(model_config).to(memory_format=torch.channels_last)
    criterion = MultiTaskLoss(
        LossWeights.from_dict(config.loss_weights),
        _attribute_frequency(data.records, data.label_space, np.random.default_rng(config.seed)),
    )
    optimizer = _optimizer(model, config)
    steps_per_epoch = len(epoch_loader(data.records, data.label_space, config, prep, 0))
    scheduler = _warmup_cosine_schedule(optimizer, steps_per_epoch * config.epochs)
    return _Run(config, out_dir, data, model_config, prep, model, criterion, optimizer, scheduler)


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
    # NaN: not labelled on that record (mixed vocabularies); an attribute no sampled record labels weighs 1
    labelled = np.stack(rows)
    known = ~np.isnan(labelled)
    frequency = np.where(known, labelled, 0.0).sum(axis=0) / np.maximum(known.sum(axis=0), 1)
    return torch.as_tensor(np.where(known.any(axis=0), frequency, 0.5), dtype=torch.float32)


def _optimizer(model: FashionNet, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with the pretrained backbone at `backbone_lr_scale` of the heads' learning rate."""
    backbone_params = list(model.backbone.parameters())
    backbone_ids = {id(p) for p in backbone_params}
    head_params = [p for p in model.parameters() if id(p) not in backbone_ids]
    return torch.optim.AdamW(
        [
            {"params": backbone_params, "lr": config.lr * config.backbone_lr_scale},
            {"params": head_params, "lr": config.lr},
        ],
        weight_decay=config.weight_decay,
    )


def _warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over WARMUP_FRACTION of the steps, then cosine decay to 0 at the last step."""
    warmup = max(1, int(total_steps * WARMUP_FRACTION))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _first_epoch(run: _Run) -> int:
    """Resume from last.pt (returns the epoch after its last finished one) or, on a fresh start, begin from
    `init_checkpoint`'s weights if there is one."""
    resume_path = run.out_dir / LAST_CHECKPOINT
    if run.config.resume and resume_path.exists():
        state = load_checkpoint(resume_path)
        run.model.load_state_dict(state["state_dict"])
        run.optimizer.load_state_dict(state["training"]["optimizer"])
        run.scheduler.load_state_dict(state["training"]["scheduler"])
        torch.set_rng_state(state["training"]["torch_rng"])
        return int(state["training"]["epoch"]) + 1
    if run.config.init_checkpoint:
        _load_initial_weights(run.model, run.config.init_checkpoint)
    return 0


def _load_initial_weights(model: FashionNet, path: str) -> None:
    """A FashionNet checkpoint's weights. The backbone must fit exactly; a head that does not (another code length,
    a shop whose categories or attributes changed, a landmark branch the checkpoint lacks and the fc7 layer that
    then takes a wider input) starts fresh."""
    initial = load_checkpoint(path)
    if initial["kind"] != "fashionnet":
        raise ValueError(f"init_checkpoint must be a fashionnet checkpoint, not {initial['kind']!r}")
    own = model.state_dict()
    weights = {k: v for k, v in initial["state_dict"].items() if k not in own or v.shape == own[k].shape}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    misfits = [key for key in [*missing, *unexpected] if key.startswith("backbone.")]
    if misfits:
        raise ValueError(f"init_checkpoint does not fit: backbone {misfits[:5]}")


def _run_epoch(run: _Run, epoch: int, progress: Callable[[dict], None] | None) -> dict:
    """One pass of optimizer steps; returns the epoch's mean loss parts, learning rate and seconds."""
    config, model = run.config, run.model
    model.train()
    started = time.perf_counter()
    sums: dict[str, float] = defaultdict(float)
    source = epoch_loader(run.data.records, run.data.label_space, config, run.prep, epoch)
    bar = tqdm(
        source,
        total=len(source),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        dynamic_ncols=True,
        mininterval=2.0,
    )
    for step, batch in enumerate(bar):
        images = batch["image"].contiguous(memory_format=torch.channels_last)
        loss, parts = run.criterion(model(images), batch)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP_NORM)
        run.optimizer.step()
        run.scheduler.step()
        sums["loss"] += float(loss.detach())
        for name, value in parts.items():
            sums[name] += float(value.detach())
        if step % LOG_EVERY_STEPS == 0 or step == len(source) - 1:
            bar.set_postfix(loss=f"{sums['loss'] / (step + 1):.4f}")
        if progress is not None:  # after every step: a callback may stop the run here (TrainingCancelled)
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
    return {
        "epoch": epoch,
        "seconds": round(time.perf_counter() - started, 2),
        "lr": run.optimizer.param_groups[1]["lr"],
        **{name: value / len(source) for name, value in sums.items()},
    }


def _validate(run: _Run) -> dict:
    assert run.data.validate is not None
    run.model.eval()
    with torch.inference_mode():
        return run.data.validate(run.model, run.prep)


def _save_epoch(run: _Run, epoch: int, metrics: dict) -> None:
    """Log the epoch's metrics and write last.pt, the state a restart resumes from."""
    with (run.out_dir / METRICS_LOG).open("a") as log:
        log.write(json.dumps(metrics) + "\n")
    training_state = {
        "epoch": epoch,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "config": run.config.to_dict(),
    }
    save_checkpoint(_checkpoint(run, metrics) | {"training": training_state}, run.out_dir / LAST_CHECKPOINT)


def _save_final(run: _Run) -> Path:
    """model.pt: the weights and the last epoch's metrics (also when a resumed run had nothing left to do)."""
    logged = read_metrics(run.out_dir)
    return save_checkpoint(_checkpoint(run, logged[-1] if logged else {}), run.out_dir / FINAL_CHECKPOINT)


def _checkpoint(run: _Run, metrics: dict) -> dict:
    return build_checkpoint(
        kind="fashionnet",
        model_config=run.model_config.to_dict(),
        label_space=run.data.label_space.to_dict(),
        preprocessing=run.prep.to_dict(),
        code_bits=run.model_config.code_bits,
        fc7_dim=run.model_config.fc7_dim,
        state_dict=run.model.state_dict(),
        metrics={**metrics, "train_config": run.config.to_dict()},
    )
