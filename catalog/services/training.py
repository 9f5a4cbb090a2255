"""Retraining runs started from the admin. A run is saved with only what the admin chose; the train worker
(workers.pipelines.training_run_execute) resolves the full configuration, writes it back here so the admin sees
what actually ran, reports progress, and registers the version it trained as ready: switching search to it is the
admin's decision (catalog.services.model_versions.model_version_switch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.db import transaction
from django.utils import timezone

from catalog import dispatch
from catalog.models import ModelVersion, TrainingRun

TRAINING_LOG_CHARS = 20_000  # the end of a traceback is what says why; the admin shows the log as it is


def training_run_start(*, run: TrainingRun) -> TrainingRun:
    """Save a prepared run and train it on the `train` queue (after commit)."""
    run.state = TrainingRun.State.PENDING
    run.save()
    dispatch.train_network(training_run_id=run.pk)
    return run


def training_run_begin(*, run: TrainingRun, config: dict[str, Any]) -> None:
    """The train worker took the run: running from zero, with the full configuration it resolved."""
    run.state = TrainingRun.State.RUNNING
    run.progress = 0.0
    run.epoch_metrics = []
    run.config = config
    run.save(update_fields=["state", "progress", "epoch_metrics", "config"])


def training_run_progress(*, run: TrainingRun, progress: float, epoch_metrics: list[dict[str, Any]]) -> None:
    run.progress = progress
    run.epoch_metrics = epoch_metrics
    run.save(update_fields=["progress", "epoch_metrics"])


def training_run_fail(*, run: TrainingRun, log: str) -> None:
    run.state = TrainingRun.State.FAILED
    run.log = log[-TRAINING_LOG_CHARS:]
    run.finished_at = timezone.now()
    run.save(update_fields=["state", "log", "finished_at"])


def training_run_finish(
    *, run: TrainingRun, checkpoint: Path, code_bits: int, fc7_dim: int, config: dict[str, Any]
) -> ModelVersion:
    """Register the trained network as a ready version (with the last epoch's metrics) and close the run."""
    with transaction.atomic():
        version = ModelVersion.objects.create(
            name=f"fashionnet-run{run.pk}",
            kind=ModelVersion.Kind.FASHIONNET,
            status=ModelVersion.Status.READY,
            checkpoint=str(checkpoint),
            code_bits=code_bits,
            fc7_dim=fc7_dim,
            config=config,
            metrics=run.epoch_metrics[-1] if run.epoch_metrics else {},
        )
        run.state = TrainingRun.State.DONE
        run.progress = 1.0
        run.model_version = version
        run.finished_at = timezone.now()
        run.save(update_fields=["state", "progress", "model_version", "finished_at", "epoch_metrics"])
    return version
