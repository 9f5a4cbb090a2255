"""`manage.py train`: the dashboard's "Training runs -> Add", for operators. The options are the dashboard's form
fields (blank = TrainConfig's default, resolved by the train worker), `--config` adds any other TrainConfig
override as JSON; `--wait` follows the run until it ends (it runs on the `train` queue's worker)."""

from __future__ import annotations

import json
import time

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from catalog.admin import TrainingRunForm
from catalog.models import TrainingRun
from catalog.services import golden, training

WAIT_POLL_S = 2.0


class Command(BaseCommand):
    help = "Start a training run (as the dashboard does) and optionally wait for it."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--epochs", type=int)
        parser.add_argument("--code-bits", type=int)
        parser.add_argument("--input-size", type=int)
        parser.add_argument("--no-fine-tune-active", action="store_true", help="start from ImageNet weights")
        parser.add_argument("--config", default="", help="more TrainConfig overrides, as a JSON object")
        parser.add_argument("--wait", action="store_true", help="follow the run until it ends")

    def handle(self, *args, **options) -> None:
        fields = {"epochs": options["epochs"], "code_bits": options["code_bits"], "input_size": options["input_size"]}
        data = {key: value for key, value in fields.items() if value is not None}
        if not options["no_fine_tune_active"]:
            data["fine_tune_active"] = "on"
        form = TrainingRunForm(data=data)
        if not form.is_valid():
            raise CommandError(form.errors.as_text())
        config = form.run_config()
        if options["config"]:
            extra = json.loads(options["config"])
            if not isinstance(extra, dict):
                raise CommandError("--config must be a JSON object")
            config = {**config, **extra}
        with transaction.atomic():
            run = training.training_run_start(run=TrainingRun(config=config))
        self.stdout.write(f"training run {run.pk} queued with {json.dumps(config) or 'the defaults'}")
        if options["wait"]:
            self._follow(run)

    def _follow(self, run: TrainingRun) -> None:
        shown = -1.0
        while True:
            run.refresh_from_db()
            if run.progress != shown:
                self.stdout.write(f"run {run.pk}: {run.state}, {run.progress:.0%}")
                shown = run.progress
            if run.state not in (TrainingRun.State.PENDING, TrainingRun.State.RUNNING):
                break
            time.sleep(WAIT_POLL_S)
        if run.state == TrainingRun.State.FAILED:
            raise CommandError(f"run {run.pk} failed:\n{run.log}")
        version = run.model_version
        if version is None:
            return
        # the same task evaluates the new version on the golden set after registering it
        while not (version.metrics or {}).get(golden.GOLDEN_METRICS_KEY):
            time.sleep(WAIT_POLL_S)
            version.refresh_from_db()
        self.stdout.write(f"registered {version.name}; golden set: {json.dumps(version.metrics['golden'])}")
