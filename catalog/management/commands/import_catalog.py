"""`manage.py import_catalog MANIFEST [--images ZIP] --merchant SLUG`: the same import as the API and the admin,
with a progress bar. By default the chunks run in the Celery workers and this command watches the job; with
`--inline` they run in this process (no worker needed; embedding is still queued for the workers)."""

from __future__ import annotations

import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from tqdm import tqdm

from catalog import selectors
from catalog.intake import IntakeError
from catalog.models import ImportJob, Merchant
from catalog.services import imports

POLL_S = 0.5  # progress bar refresh while workers import
REJECTED_SHOWN = 20  # the rest are in the admin and the API


class Command(BaseCommand):
    help = "Import a catalog manifest (CSV or JSON lines) and a zip of its images for a merchant."

    def add_arguments(self, parser) -> None:
        parser.add_argument("manifest", type=Path)
        parser.add_argument("--images", type=Path, help="zip of the image files the manifest names")
        parser.add_argument("--merchant", required=True, help="merchant slug")
        parser.add_argument("--create-merchant", action="store_true", help="create the merchant if it is missing")
        parser.add_argument("--format", choices=["csv", "jsonl"], help="default: from the file name or contents")
        parser.add_argument("--inline", action="store_true", help="run the chunks here instead of in the workers")
        parser.add_argument("--chunk-rows", type=int, default=imports.IMPORT_CHUNK_ROWS)
        parser.add_argument("--no-wait", action="store_true", help="queue the job and exit")
        parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the workers")

    def handle(self, *args, **options) -> None:
        manifest_path = Path(options["manifest"])
        if not manifest_path.is_file():
            raise CommandError(f"no such manifest: {manifest_path}")
        images = Path(options["images"]) if options["images"] else None
        try:
            with transaction.atomic():  # a refused upload leaves nothing, not even a merchant made for it
                merchant = self._merchant(options["merchant"], options["create_merchant"])
                archive = images.open("rb") if images else None
                try:
                    job = imports.import_job_create(
                        merchant=merchant,
                        manifest=manifest_path.read_bytes(),
                        manifest_name=manifest_path.name,
                        manifest_format=options["format"],
                        archive=archive,
                        chunk_rows=options["chunk_rows"],
                        enqueue=not options["inline"],
                    )
                finally:
                    if archive is not None:
                        archive.close()
        except (IntakeError, OSError) as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"import {job.pk}: {job.total} rows in {job.chunks_total} chunks, {job.rejected} rejected at upload"
        )
        if options["no_wait"]:
            return
        # The raw stream under Django's OutputWrapper: the wrapper would end tqdm's carriage-return redraws in newlines.
        stream = getattr(self.stderr, "_out", None)
        with tqdm(total=job.total, initial=job.processed, unit="row", desc=f"import {job.pk}", file=stream) as bar:
            if options["inline"]:
                for chunk_id in job.chunks.filter(done=False).order_by("index").values_list("id", flat=True):
                    imports.import_run_chunk(chunk_id=chunk_id)
                    job.refresh_from_db()
                    self._update(bar, job)
            else:
                deadline = time.monotonic() + options["timeout"]
                while job.state not in (ImportJob.State.DONE, ImportJob.State.FAILED):
                    if time.monotonic() > deadline:
                        raise CommandError(
                            f"import {job.pk} not done after {options['timeout']:.0f} s: is a worker up?"
                        )
                    time.sleep(POLL_S)
                    job.refresh_from_db()
                    self._update(bar, job)
        self._summary(job)

    def _merchant(self, slug: str, create: bool) -> Merchant:
        merchant = Merchant.objects.filter(slug=slug).first()
        if merchant is None:
            if not create:
                raise CommandError(f"no merchant {slug!r} (use --create-merchant)")
            merchant = Merchant.objects.create(slug=slug, name=slug.replace("-", " ").title())
        return merchant

    def _update(self, bar: tqdm, job: ImportJob) -> None:
        bar.update(job.processed - bar.n)
        bar.set_postfix(ok=job.ok, rejected=job.rejected)

    def _summary(self, job: ImportJob) -> None:
        progress = selectors.import_job_progress(job=job)
        self.stdout.write(
            self.style.SUCCESS(f"import {job.pk} {job.state}: {job.ok} ok, {job.rejected} rejected of {job.total}; ")
            + f"{job.images_new} new images ({progress.images_pending} of the merchant's images await embedding)"
        )
        for row in selectors.import_job_rejected_rows(job=job)[:REJECTED_SHOWN]:
            self.stdout.write(f"  line {row['line']}: {row['sku'] or '-'}: {row['error']}")
        if job.rejected > REJECTED_SHOWN:
            self.stdout.write(f"  ... and {job.rejected - REJECTED_SHOWN} more (admin or API)")
