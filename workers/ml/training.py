"""Train FashionNet on CPU: P x K instance batches, mixed labels, resumable, deterministic from a seed.

    train(TrainConfig.from_overrides({"epochs": 3}), progress=callback)  # -> path of the final checkpoint
    python -m workers.ml.train --config cfg.json                         # the command line (workers.ml.train)

Output directory:
    last.pt         resumable state after the latest finished epoch (model, optimizer, scheduler, epoch, rng)
    model.pt        the final self-describing checkpoint for Encoder.load (no optimizer state): the epoch that scored
                    best on validation, the start included (`select_on_validation`), else the last epoch's
    best.pt         the best state so far on validation, and its score (best.json)
    start.pt        version 0 fitted on the catalog, when the run starts from one it fitted itself
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
from workers.ml.baseline import fit_baseline
from workers.ml.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint
from workers.ml.datasets.factory import TrainingData, build_dataset
from workers.ml.datasets.torch_dataset import RecordDataset, instance_ids
from workers.ml.losses import LossWeights, MultiTaskLoss
from workers.ml.model import FashionNet, FashionNetConfig
from workers.ml.preprocess import Preprocessing, preprocess_batch
from workers.ml.records import LabelSpace, Record, collate
from workers.ml.sampler import PKBatchSampler
from workers.ml.warm_start import (
    baseline_model_config,
    fit_sample,
    freeze_backbone,
    held_statistics,
    warm_start_from_baseline,
)

LOG_EVERY_STEPS = 20  # progress bar refresh cadence (the progress callback hears of every step)
GRADIENT_CLIP_NORM = 5.0  # batch-hard mining occasionally produces a spike; clipping keeps Adam calm
WARMUP_FRACTION = 0.03  # linear warm-up: the new heads start random on top of a pretrained backbone
LAST_CHECKPOINT = "last.pt"
FINAL_CHECKPOINT = "model.pt"
BEST_CHECKPOINT = "best.pt"
BEST_SCORE = "best.json"
START_CHECKPOINT = "start.pt"
METRICS_LOG = "metrics.jsonl"
START_EPOCH = -1  # the metrics row of the network as it starts, before any step (version 0 after a warm start)
SELECTION_METRIC = "cascade"  # the validator's key a checkpoint is chosen on: R@1 through codes then fc7
START_FIT_SAMPLE = 3000  # catalog images version 0 is fitted on when a run fits its own start (as the shop's is)
HASH_SCALE_SAMPLE = 32  # catalog photos that set the warm-started hash layer's scale
# TrainConfig fields whose keys are independent settings: overrides are merged into them key by key
MERGED_FIELDS = ("model", "loss_weights")


DEFAULT_MODEL = {
    "input_size": 224,
    "global_head": True,
    "fc6_global_dim": 512,
    "fc7_dim": 256,
    "code_bits": 256,
    "dropout": 0.0,  # the warm start's fc7 is version 0's: no noise between what trains and what serves
}


@dataclass
class TrainConfig:
    """A training run, JSON-serialisable (the dashboard stores it with the run). The one home of the training
    defaults: a caller that keeps only what differs from them resolves the whole config with `from_overrides`."""

    out_dir: str = "var/runs/default"
    dataset: dict = field(default_factory=lambda: {"name": "fashion-mnist"})  # a spec for datasets.factory
    # FashionNetConfig fields; label sizes are filled from the data. The default is version 0's shape (224 px, the
    # conv head's GeM, fc7 256 = half of fc6_global, 256 bits): a shop's retrain starts as its version 0.
    model: dict = field(default_factory=lambda: dict(DEFAULT_MODEL))
    loss_weights: dict = field(default_factory=dict)  # LossWeights fields
    epochs: int = 2
    steps_per_epoch: int = 0  # 0 = one pass over the instances (P instances per batch)
    instances_per_batch: int = 32  # P, of the products in the metric space (others come on top: batch_products)
    views_per_instance: int = 2  # K
    clean_views: int = 1  # of the K views, this many are the unaugmented catalog photo (what queries match)
    augment: str = "strong"  # shopper-view strength for the other views (workers.ml.augment.STRENGTHS)
    lr: float = 1e-3
    backbone_lr_scale: float = 0.3  # pretrained layers move slower than the heads
    weight_decay: float = 1e-4
    seed: int = 0
    num_threads: int = 2
    loader_workers: int = 1  # augmentation runs beside the training step; 0 = in the training process
    resume: bool = True
    # Start from this checkpoint: a FashionNet's weights (fine-tuning, e.g. the active version), or a version 0
    # ("baseline" checkpoint): the network then takes version 0's sizes and starts as exactly its function
    # (workers.ml.warm_start).
    init_checkpoint: str = ""
    # Without init_checkpoint, on the packaged ImageNet backbone: fit version 0 on the catalog (start.pt) and start
    # from it, as from a shop's own version 0.
    start_from_version0: bool = True
    trainable_blocks: int = 2  # the backbone's last blocks that train (with its conv head and the heads); -1 = all
    # model.pt = the epoch best on validation (validate's SELECTION_METRIC), the start included: a run keeps the
    # network it started from unless training measured better.
    select_on_validation: bool = True

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
    ids = instance_ids(records)
    sampler = PKBatchSampler(
        ids,
        batch_products(config.instances_per_batch, ids, getattr(records, "metric_products", None)),
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


def batch_products(metric_products_per_batch: int, ids: np.ndarray, metric_products: int | None) -> int:
    """Products per batch: P in the metric space, and the products outside it (rendered ones mixed into a shop's
    retrain, datasets.mixed) on top in their share of the data, so the mix leaves the metric losses as many of the
    shop's products to compare in a batch as the catalog alone. Measured (bench_shop_recipe, 1,000 products, a
    quarter rendered): with the renders taking a quarter of P's places, golden R@1 0.66 (validation) / 0.635
    (test); with them on top, 0.685 / 0.670."""
    if metric_products is None:
        return metric_products_per_batch
    products = len(np.unique(ids[ids >= 0]))
    return -(-metric_products_per_batch * products // max(metric_products, 1))  # ceil, in integers


def preprocessing_for(model_config: FashionNetConfig) -> Preprocessing:
    mean, std = (
        (PACKAGED_MEAN, PACKAGED_STD) if model_config.backbone == PACKAGED_BACKBONE else (IMAGENET_MEAN, IMAGENET_STD)
    )
    return Preprocessing(model_config.input_size, mean, std)


def build_model_config(config: TrainConfig, label_space: LabelSpace, model: Mapping | None = None) -> FashionNetConfig:
    """`model` (default: config.model) with the label sizes of `label_space`."""
    return FashionNetConfig.from_dict(
        {
            **(config.model if model is None else model),
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
    first_epoch = _first_epoch(run)
    if first_epoch == 0 and _selecting(run):  # the start is a candidate too: scored before the first step
        metrics = {"epoch": START_EPOCH, "validation": _validate(run)}
        _log_metrics(run, metrics)
        _keep_if_best(run, metrics)
        if progress is not None:
            progress({"epoch": START_EPOCH, "epochs": config.epochs, "done": True, "metrics": metrics})
    for epoch in range(first_epoch, config.epochs):
        metrics = _run_epoch(run, epoch, progress)
        if run.data.validate is not None:
            metrics["validation"] = _validate(run)
        _save_epoch(run, epoch, metrics)
        if _selecting(run):
            _keep_if_best(run, metrics)
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
    start: dict | None  # the version 0 checkpoint the network starts as, if it does
    held: list[torch.nn.Module]  # BatchNorms whose statistics stay frozen in training (warm_start.held_statistics)


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
    """The network (fresh heads on the pretrained backbone, or shaped as the version 0 it starts from, or as the
    network it fine-tunes), its loss, optimizer and learning-rate schedule; the backbone frozen but for its last
    `trainable_blocks`."""
    start, model_fields = _start_and_model(config, data, out_dir)
    model_config = build_model_config(config, data.label_space, model_fields)
    prep = preprocessing_for(model_config)
    model = FashionNet(model_config).to(memory_format=torch.channels_last)
    freeze_backbone(model, config.trainable_blocks)
    criterion = MultiTaskLoss(
        LossWeights.from_dict(config.loss_weights),
        _attribute_frequency(data.records, data.label_space, np.random.default_rng(config.seed)),
    )
    optimizer = _optimizer(model, config)
    steps_per_epoch = len(epoch_loader(data.records, data.label_space, config, prep, 0))
    scheduler = _warmup_cosine_schedule(optimizer, steps_per_epoch * config.epochs)
    held = held_statistics(model, warm_started=model_config.global_head)
    return _Run(config, out_dir, data, model_config, prep, model, criterion, optimizer, scheduler, start, held)


def _start_and_model(config: TrainConfig, data: TrainingData, out_dir: Path) -> tuple[dict | None, dict]:
    """The version 0 checkpoint the network starts as (None: it does not), and the FashionNetConfig fields to
    build it with: version 0's sizes for a warm start, the fine-tuned network's architecture for a FashionNet
    init_checkpoint (its code length may change: the hash layer then starts fresh), else config.model."""
    if config.init_checkpoint:
        initial = load_checkpoint(config.init_checkpoint)
        if initial["kind"] == "baseline":
            return initial, baseline_model_config(initial, config.model)
        if initial["kind"] == "fashionnet":
            code_bits = config.model.get("code_bits", DEFAULT_MODEL["code_bits"])
            return None, {**initial["model_config"], "code_bits": code_bits}
        raise ValueError(f"init_checkpoint must be a fashionnet or baseline checkpoint, not {initial['kind']!r}")
    model = FashionNetConfig.from_dict(config.model)
    if not (config.start_from_version0 and model.backbone == PACKAGED_BACKBONE and model.packaged_weights):
        return None, config.model  # version 0 exists only on the packaged ImageNet weights
    path = out_dir / START_CHECKPOINT
    if not path.exists():  # a resumed run starts from the same fit
        # fitted on the shop's own photos, as the shop's version 0 is: with rendered products mixed in
        # (datasets.mixed), the catalog is the first part, whose category indices the merged label space keeps
        own = getattr(data.records, "parts", [data.records])[0]
        chosen = fit_sample(START_FIT_SAMPLE, len(own), config.seed)
        records = [own[int(i)] for i in chosen]
        categories = data.label_space.categories
        fit_baseline(
            [r.image for r in records],
            out_path=path,
            categories=[categories[r.category] if r.category >= 0 else None for r in records],
            code_bits=model.code_bits,
            fc7_dim=model.fc7_dim,
            input_size=model.input_size,
            pooling=model.pooling,
            seed=config.seed,
        )
    start = load_checkpoint(path)
    return start, baseline_model_config(start, config.model)


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
    """AdamW over what trains, the pretrained backbone (and its conv head) at `backbone_lr_scale` of the heads'
    learning rate."""
    pretrained = [model.backbone, *([model.global_head] if model.global_head is not None else [])]
    backbone_params = [p for module in pretrained for p in module.parameters() if p.requires_grad]
    backbone_ids = {id(p) for module in pretrained for p in module.parameters()}
    head_params = [p for p in model.parameters() if id(p) not in backbone_ids and p.requires_grad]
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
    if run.start is not None:
        sample = [run.data.records[int(i)].image for i in fit_sample(HASH_SCALE_SAMPLE, len(run.data.records), 0)]
        warm_start_from_baseline(run.model, run.start, preprocess_batch(sample, run.prep)[0])
    elif run.config.init_checkpoint:
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
    for norm in run.held:
        norm.eval()
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


def _log_metrics(run: _Run, metrics: dict) -> None:
    with (run.out_dir / METRICS_LOG).open("a") as log:
        log.write(json.dumps(metrics) + "\n")


def _selecting(run: _Run) -> bool:
    return run.config.select_on_validation and run.data.validate is not None


def _keep_if_best(run: _Run, metrics: dict) -> None:
    """best.pt := this state if it scores strictly better on validation than the best so far (ties keep the
    earlier one: the start wins a tie), best.json its score."""
    score = float(metrics.get("validation", {}).get(SELECTION_METRIC, float("-inf")))
    score = score if math.isfinite(score) else float("-inf")  # a diverged epoch (NaN) is never chosen
    score_path = run.out_dir / BEST_SCORE
    best = json.loads(score_path.read_text()) if score_path.exists() else None
    if best is not None and score <= best["score"]:
        return
    save_checkpoint(_checkpoint(run, metrics), run.out_dir / BEST_CHECKPOINT)
    score_path.write_text(json.dumps({"epoch": metrics["epoch"], "score": score, "metric": SELECTION_METRIC}))


def _save_epoch(run: _Run, epoch: int, metrics: dict) -> None:
    """Log the epoch's metrics and write last.pt, the state a restart resumes from."""
    _log_metrics(run, metrics)
    training_state = {
        "epoch": epoch,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "config": run.config.to_dict(),
    }
    save_checkpoint(_checkpoint(run, metrics) | {"training": training_state}, run.out_dir / LAST_CHECKPOINT)


def _save_final(run: _Run) -> Path:
    """model.pt: the best state on validation with its metrics when selecting, else the weights and the last
    epoch's metrics (also when a resumed run had nothing left to do)."""
    best_path = run.out_dir / BEST_CHECKPOINT
    if _selecting(run) and best_path.exists():
        best = load_checkpoint(best_path)
        selection = json.loads((run.out_dir / BEST_SCORE).read_text())
        best["metrics"] = {**best["metrics"], "selected_epoch": selection["epoch"], "selected_on": selection["metric"]}
        return save_checkpoint(best, run.out_dir / FINAL_CHECKPOINT)
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
