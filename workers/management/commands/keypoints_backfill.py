"""`manage.py keypoints_backfill`: local features for catalog images embedded before geometric verification existed.

The embed worker stores an image's keypoints (catalog.geometry) when it embeds it; images embedded earlier have none,
and the search's verify stage leaves them unverified. This computes the missing ones in batches, in this process
(OpenCV only, no network); run it once after upgrading, or any time: it skips images that have them.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand

from catalog import selectors
from catalog.models import ImageKeypoints, ProductImage
from workers import pipelines

BATCH = 64


class Command(BaseCommand):
    help = "Compute and store local features (geometric verification) for images that have none yet."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--limit", type=int, default=None, help="at most this many images")

    def handle(self, *args, limit: int | None, **options) -> None:
        missing = (
            ProductImage.objects.exclude(status=ProductImage.Status.FAILED)
            .exclude(pk__in=ImageKeypoints.objects.values("image_id"))
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        ids = list(missing[:limit] if limit else missing)
        stored = unreadable = 0
        for start in range(0, len(ids), BATCH):
            loaded = []
            for image in selectors.images_by_id(image_ids=ids[start : start + BATCH]):
                try:
                    loaded.append((image, selectors.image_open(image=image)))
                except Exception:  # a broken file is the embed worker's to report; here it is only skipped
                    unreadable += 1
            stored += pipelines.keypoints_store(loaded)
            self.stdout.write(f"\r{min(start + BATCH, len(ids))}/{len(ids)} images", ending="")
        self.stdout.write(f"\nstored the keypoints of {stored} images ({unreadable} unreadable, skipped)")
