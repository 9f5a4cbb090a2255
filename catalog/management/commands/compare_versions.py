"""`manage.py compare_versions CANDIDATE [OTHER]`: two versions' golden-set numbers side by side (OTHER defaults to
the active version), per category too, the candidate's top-10 overlap on recent shopper queries, and whether
switching to CANDIDATE would need the override: what the admin's compare page and switch show."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from catalog import selectors
from catalog.management.commands._versions import (
    golden_per_category,
    golden_side_by_side,
    recent_overlap_line,
    version_named,
)
from catalog.services import model_versions


class Command(BaseCommand):
    help = "Compare two model versions on the golden set (the candidate against the active one by default)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("candidate", help="name or id")
        parser.add_argument("other", nargs="?", default="", help="name or id (default: the active version)")

    def handle(self, *args, candidate: str, other: str, **options) -> None:
        chosen = version_named(candidate)
        against = version_named(other) if other else selectors.model_version_active()
        if against is None:
            raise CommandError("no active version to compare with: name one")
        self.stdout.write(golden_side_by_side([chosen, against]))
        self.stdout.write(golden_per_category([chosen, against]))
        self.stdout.write(recent_overlap_line(chosen))
        concern = model_versions.model_version_switch_concern(version=chosen)
        if concern is not None:
            self.stdout.write(f"switching to {chosen.name} needs --override: {concern.reason}")
        elif chosen.status == "ready":
            self.stdout.write(f"switching to {chosen.name} needs no override")
