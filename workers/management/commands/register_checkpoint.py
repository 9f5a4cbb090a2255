"""`manage.py register_checkpoint PATH`: a network trained elsewhere (for example by `python -m
workers.ml.benchmark` or `python -m workers.ml.train`) as a ready model version.

The checkpoint is copied under MODELS_DIR (which every worker reads), loaded here the way a worker loads it (which
proves it works and gives its real sizes), and registered READY; `--evaluate` then runs its golden-set evaluation.
Switching search to it stays a separate decision (`switch_version`, or the admin)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from catalog.models import ModelVersion
from catalog.services import model_versions
from workers import pipelines

REGISTERED_DIR = "registered"  # under MODELS_DIR


class Command(BaseCommand):
    help = "Register a checkpoint trained elsewhere as a ready model version (after checking it loads)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("path", type=Path, help="a self-describing checkpoint (.pt) of workers.ml")
        parser.add_argument("--name", default="", help="the version's name (default: the file's name)")
        parser.add_argument("--evaluate", action="store_true", help="evaluate it on the golden set right away")

    def handle(self, *args, path: Path, name: str, evaluate: bool, **options) -> None:
        if not path.is_file():
            raise CommandError(f"{path} is not a file")
        name = name or path.stem
        if ModelVersion.objects.filter(name=name).exists():
            raise CommandError(f"a model version named {name!r} exists already (choose another with --name)")
        target = Path(settings.MODELS_DIR) / REGISTERED_DIR / f"{name}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        try:
            encoder = pipelines.encoder_at(target)
        except Exception as exc:
            target.unlink(missing_ok=True)
            raise CommandError(f"{path} does not load as a model: {type(exc).__name__}: {exc}") from exc
        info = encoder.version_info
        kind = str(ModelVersion.Kind.FASHIONNET if info["kind"] == "fashionnet" else ModelVersion.Kind.BASELINE)
        version = model_versions.model_version_register(
            name=name, kind=kind, checkpoint=target, code_bits=encoder.code_bits, fc7_dim=encoder.fc7_dim,
            config={**info, "registered_from": str(path.resolve())},
        )  # fmt: skip
        sizes = f"{encoder.code_bits} bits, fc7 {encoder.fc7_dim}"
        self.stdout.write(f"registered {version.name} (id {version.pk}): {sizes}")
        if evaluate:
            numbers = pipelines.version_evaluate_golden(version_id=version.pk)
            self.stdout.write(json.dumps({"version": version.name, **numbers}, indent=2))
