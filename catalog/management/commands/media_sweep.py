"""`manage.py media_sweep`: delete shoppers' photos past their shop's retention (as beat does hourly), then stored
files no row points at (a worker killed mid-import leaves some)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from catalog.services import maintenance


class Command(BaseCommand):
    help = (
        "Delete shoppers' photos past their shop's retention, then product image, import upload and shopper photo "
        "files that no database row references."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--min-age", type=float, default=maintenance.MEDIA_ORPHAN_MIN_AGE_S, help="seconds")

    def handle(self, *args, min_age: float, **options) -> None:
        expired = maintenance.shopper_photos_expire()
        self.stdout.write(f"{expired} shoppers' photos past their shop's retention deleted")
        deleted = maintenance.media_orphans_delete(min_age_s=min_age)
        deleted += maintenance.golden_orphans_delete(min_age_s=min_age)
        self.stdout.write(f"{deleted} unreferenced files deleted")
