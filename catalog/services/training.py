"""Retraining runs started from the admin. A run is saved with only what the admin chose; the train worker
(workers.pipelines.training_run_execute) resolves the full configuration, writes it back here so the admin sees
what actually ran, reports progress, and registers the version it trained as ready: switching search to it is the
admin's decision (catalog.services.model_versions.model_version_switch)."""

from __future__ import annotations

import math
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


def training_run_begin(*, run: TrainingRun, config: dict[str, Any]) -> bool:
    """The train worker took the run: running from zero, with the full configuration it resolved. False (and
    nothing changed) if the run was cancelled while it waited."""
    started = TrainingRun.objects.filter(pk=run.pk, cancel_requested=False).update(
        state=TrainingRun.State.RUNNING, progress=0.0, epoch_metrics=[], config=config
    )
    if started:
        run.state, run.progress, run.epoch_metrics, run.config = TrainingRun.State.RUNNING, 0.0, [], config
    return bool(started)


CANCELLABLE_STATES = (TrainingRun.State.PENDING, TrainingRun.State.RUNNING)


def training_run_cancel(*, run: TrainingRun) -> bool:
    """The admin's "cancel": a waiting run is cancelled at once; a running one is flagged, and its worker stops
    between two steps and marks it cancelled (nothing is registered). False if the run had already ended."""
    with transaction.atomic():
        locked = TrainingRun.objects.select_for_update().get(pk=run.pk)
        if locked.state not in CANCELLABLE_STATES:
            return False
        locked.cancel_requested = True
        fields = ["cancel_requested"]
        if locked.state == TrainingRun.State.PENDING:
            locked.state, locked.finished_at = TrainingRun.State.CANCELLED, timezone.now()
            fields += ["state", "finished_at"]
        locked.save(update_fields=fields)
    return True


def training_run_cancelled(*, run: TrainingRun) -> None:
    """The worker stopped a run the admin cancelled."""
    run.state = TrainingRun.State.CANCELLED
    run.finished_at = timezone.now()
    run.log = "cancelled by an admin"
    run.save(update_fields=["state", "finished_at", "log"])


def training_run_progress(*, run: TrainingRun, progress: float, epoch_metrics: list[dict[str, Any]]) -> None:
    """The run's fraction done and per-epoch metrics; a metric that is not a finite number (a diverged loss, an
    empty evaluation's mean) is saved as null: JSON has no NaN, and PostgreSQL refuses it."""
    run.progress = progress
    run.epoch_metrics = _finite_or_none(epoch_metrics)
    run.save(update_fields=["progress", "epoch_metrics"])


def training_run_fail(*, run: TrainingRun, log: str) -> None:
    run.state = TrainingRun.State.FAILED
    run.log = log[-TRAINING_LOG_CHARS:]
    run.finished_at = timezone.now()
    run.save(update_fields=["state", "log", "finished_at"])


def training_run_finish(
    *, run: TrainingRun, checkpoint: Path, code_bits: int, fc7_dim: int, config: dict[str, Any]
) -> ModelVersion | None:
    """Register the trained network as a ready version (with the last epoch's metrics) and close the run; or, if
    the admin cancelled it after its last check, close it cancelled and register nothing (None)."""
    with transaction.atomic():
        if TrainingRun.objects.select_for_update().filter(pk=run.pk, cancel_requested=True).exists():
            training_run_cancelled(run=run)
            return None
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


def _finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float in it (lists and dicts included) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value
