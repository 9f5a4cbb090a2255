"""`manage.py switch_version NAME [--override]`: the admin's "Switch search to this version". The version embeds
the catalog in the background (workers on the embed queue) and search switches once it is complete. A new version
that scores worse than the active one on the golden set is refused unless `--override`; rolling back to a retired
version is one command."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from catalog.management.commands._versions import golden_side_by_side, version_named
from catalog.services import model_versions


class Command(BaseCommand):
    help = "Switch search to a model version (refused if it is worse on the golden set, unless --override)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("version", help="name or id")
        parser.add_argument("--override", action="store_true", help="switch even if it scores worse")

    def handle(self, *args, version: str, override: bool, **options) -> None:
        chosen = version_named(version)
        try:
            with transaction.atomic():
                model_versions.model_version_switch(version=chosen, override=override)
        except model_versions.SwitchNeedsOverride as concern:
            self.stderr.write(golden_side_by_side([concern.candidate, concern.active]))
            raise CommandError(f"not switched: {concern.reason}; add --override to switch anyway") from concern
        except ValueError as exc:
            raise CommandError(f"not switched: {exc}") from exc
        self.stdout.write(f"{chosen.name} is indexing: search switches to it once every image has its embedding")
