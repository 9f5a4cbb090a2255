"""`manage.py evaluate_version NAME_OR_ID`: the admin's "Evaluate on the golden set", for operators.

Runs the evaluation here (this process loads the network: it is a worker-side command) and prints the numbers it
stores on the version; with `--queue` it is handed to a worker on the `train` queue instead, as the admin does."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from catalog.management.commands._versions import version_named
from catalog.services import golden
from workers import pipelines


class Command(BaseCommand):
    help = "Evaluate a model version on the golden set (R@1, R@10, mAP@10, per-stage recall, encode latency)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("version", help="the version's name or id")
        parser.add_argument("--queue", action="store_true", help="hand it to a worker instead of running it here")

    def handle(self, *args, version: str, queue: bool, **options) -> None:
        chosen = version_named(version)
        if not chosen.checkpoint:
            raise CommandError(f"{chosen.name} has no checkpoint to evaluate")
        if queue:
            with transaction.atomic():
                golden.version_evaluate(version=chosen)
            self.stdout.write(f"queued: the numbers will appear on {chosen.name}")
            return
        numbers = pipelines.version_evaluate_golden(version_id=chosen.pk)
        self.stdout.write(json.dumps({"version": chosen.name, **numbers}, indent=2))
