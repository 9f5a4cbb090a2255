"""Catalog imports: an uploaded manifest (and zip of images) becomes an import job whose chunks the embed workers
run, each exactly once, in one transaction that writes its products, images and the job's counters.

A chunk's rows go one way, whatever else writes the same products at the same time: every row's images are read and
validated first (a bad row is rejected whole, with its line), then the products are upserted together
(catalog.services.products.products_upsert: inserts that meet a concurrent writer's rows wait for it and leave them
alone, then every product is locked and only changed fields are written), then the images are placed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from catalog import dispatch
from catalog.intake import IntakeError
from catalog.intake.images import ValidatedImage, image_validate
from catalog.intake.manifests import ManifestRow, RowError, is_image_url, manifest_parse
from catalog.intake.zips import SafeZip, zip_check
from catalog.models import ImportChunk, ImportJob, Merchant, Product, ProductImage
from catalog.services.products import (
    image_delete,
    image_fetch,
    image_file_write,
    product_values,
    products_upsert,
)

IMPORT_CHUNK_ROWS = 3 * dispatch.EMBED_CHUNK  # ~1 s of work per task (a lost worker redoes little); full embed batches
URL_FETCH_THREADS = 8  # image hosts answer in parallel: a chunk waits for its slowest fetch, not for their sum
URL_CHUNK_ROWS = 24  # chunks with image URLs: even with slow hosts their fetches stay well inside the time limit
# Image URLs per chunk (a row may list 10): fetched URL_FETCH_THREADS at a time, each within IMAGE_FETCH_DEADLINE_S
# (30 s), a chunk of hanging hosts gives up after 4 x 30 s = 2 minutes, inside its 5-minute soft limit.
URL_CHUNK_MAX_URLS = 4 * URL_FETCH_THREADS
# Deliveries of one chunk before it is given up: each counts, whatever ended it (an exception the task retried, a
# worker killed out of memory, the hard time limit). A chunk that keeps dying ends FAILED, its rows rejected with
# the reason, instead of being re-queued forever. workers/tasks.py retries exceptions within the same budget.
IMPORT_CHUNK_MAX_ATTEMPTS = 4


def import_job_create(
    *,
    merchant: Merchant,
    manifest: bytes,
    manifest_name: str = "",
    manifest_format: str | None = None,
    archive: File | None = None,
    created_by: Any = None,
    chunk_rows: int = IMPORT_CHUNK_ROWS,
    enqueue: bool = True,
) -> ImportJob:
    """Check an upload as a whole and record it as an import job whose chunks run in Celery after commit.

    The manifest is parsed whole, the zip only as far as its central directory (names, types, the sizes and ratios
    its headers declare): a file-level problem found there (not a manifest, a zip slip, a declared zip bomb) raises
    IntakeError and stores nothing. Inflating the zip is the job's first task (`import_archive_check`): a zip whose
    real bytes break the caps ends the job FAILED, with the reason, before any chunk runs. Row-level problems
    become rejected rows with their line numbers, counted at once; good rows are split into chunks of
    `chunk_rows`. With `enqueue=False` the caller runs the chunks itself (`import_run_chunk`, which then checks the
    zip first; e.g. `import_catalog --inline`).
    """
    parsed = manifest_parse(manifest, filename=manifest_name, manifest_format=manifest_format)
    errors = list(parsed.errors)
    rows: list[ManifestRow] = []
    safe_zip: SafeZip | None = None
    if archive is not None:
        zip_cap, size = settings.IMPORT_ZIP_MAX_BYTES, archive.seek(0, 2)
        if size > zip_cap:  # (the API and the admin refuse it before it is read: catalog.api.body_limits)
            raise IntakeError(f"the zip of images is {size:,} bytes; the limit is {zip_cap:,}")
        archive.seek(0)
        safe_zip = SafeZip(archive, max_total_bytes=settings.IMPORT_ZIP_MAX_INFLATED_BYTES)
    for row in parsed.rows:
        resolved, missing = [], []
        for reference in row.images:
            if is_image_url(reference):
                resolved.append(reference)
            elif safe_zip is not None and (name := safe_zip.resolve(reference)) is not None:
                resolved.append(name)
            else:
                missing.append(reference)
        if missing:
            where = "the zip" if safe_zip is not None else "the upload (no zip of images was given)"
            errors.append(RowError(row.line, row.sku, f"image {missing[0]!r} is not in {where}"))
        else:
            rows.append(dataclasses.replace(row, images=tuple(resolved)))
    if safe_zip is not None:
        safe_zip.close()
    errors.sort(key=lambda error: error.line)

    chunks = _chunks_split(rows, max(1, chunk_rows))
    with transaction.atomic():
        job = ImportJob(
            merchant=merchant,
            created_by=created_by,
            source_name=(manifest_name or "manifest")[:300],
            manifest_format=parsed.format,
            total=parsed.total,
            processed=len(errors),
            rejected=len(errors),
            errors=[error.to_json() for error in errors],
            chunks_total=len(chunks),
        )
        if not chunks:
            job.state = ImportJob.State.DONE
            job.started_at = job.finished_at = timezone.now()
        if archive is not None and chunks:
            archive.seek(0)
            job.archive.save(f"import-{merchant.pk}-{uuid.uuid4().hex}.zip", File(archive), save=False)
        job.save()
        created = ImportChunk.objects.bulk_create(
            ImportChunk(job=job, index=index, rows=[row.to_json() for row in chunk])
            for index, chunk in enumerate(chunks)
        )
        if enqueue and job.archive:
            dispatch.check_import_archive(job_id=job.pk)  # which queues the chunks once the zip has passed
        for chunk_row in created if enqueue and not job.archive else ():
            dispatch.run_import_chunk(chunk_id=chunk_row.pk)
    return job


def _chunks_split(rows: Sequence[ManifestRow], chunk_rows: int) -> list[list[ManifestRow]]:
    """Rows in order, in chunks of at most `chunk_rows`; a chunk holding image URLs is smaller: at most
    URL_CHUNK_ROWS rows and URL_CHUNK_MAX_URLS URLs (a row's URLs are never split across chunks)."""
    chunks: list[list[ManifestRow]] = []
    current: list[ManifestRow] = []
    urls = 0
    for row in rows:
        row_urls = sum(1 for reference in row.images if is_image_url(reference))
        limit = min(chunk_rows, URL_CHUNK_ROWS) if urls + row_urls else chunk_rows
        if current and (len(current) >= limit or urls + row_urls > URL_CHUNK_MAX_URLS):
            chunks.append(current)
            current, urls = [], 0
        current.append(row)
        urls += row_urls
    if current:
        chunks.append(current)
    return chunks


def import_archive_check(*, job_id: int, enqueue: bool = True) -> bool:
    """Inflate the job's zip once, counting real bytes against the caps (catalog.intake.zips.zip_check), then
    queue its chunks (`enqueue`). A zip that fails ends the job FAILED with the reason and its upload deleted;
    nothing of it was written, and nothing else is touched. Runs under the job's row lock, so exactly once
    however many deliveries race; True when the chunks may run."""
    with transaction.atomic():
        job = ImportJob.objects.select_for_update().get(pk=job_id)
        if job.state == ImportJob.State.FAILED:
            return False
        if job.archive and not job.archive_checked:
            try:
                with job.archive.open("rb") as handle:
                    zip_check(handle, max_total_bytes=settings.IMPORT_ZIP_MAX_INFLATED_BYTES)
            except (IntakeError, OSError) as exc:
                _job_fail(job, f"the zip of images was refused: {exc}")
                return False
            job.archive_checked = True
            job.save(update_fields=["archive_checked"])
        if enqueue:
            for chunk_id in job.chunks.filter(done=False).values_list("id", flat=True):
                dispatch.run_import_chunk(chunk_id=chunk_id)
    return True


def import_job_fail(*, job_id: int, error: str) -> bool:
    """End a job that has not finished as FAILED with the reason (e.g. its zip check ran out of time)."""
    with transaction.atomic():
        job = ImportJob.objects.select_for_update().get(pk=job_id)
        if job.state in (ImportJob.State.DONE, ImportJob.State.FAILED):
            return False
        _job_fail(job, error)
    return True


def _job_fail(job: ImportJob, error: str) -> None:
    """Mark a locked job FAILED; its upload is deleted once that commits (no chunk will read it)."""
    job.state, job.error, job.finished_at = ImportJob.State.FAILED, error[:2000], timezone.now()
    fields = ["state", "error", "finished_at"]
    if job.archive:
        archive_name, storage = job.archive.name, job.archive.storage
        transaction.on_commit(lambda: storage.delete(archive_name))
        job.archive = ""
        fields.append("archive")
    job.save(update_fields=fields)


def import_job_resume(*, job: ImportJob) -> int:
    """Queue again every chunk of `job` not yet committed (after a broker lost its messages); returns how many.
    Safe at any time: a chunk that is running or done is skipped by its own lock and flag. A job whose zip has
    not been checked yet gets its check queued again instead (which queues the chunks)."""
    if job.archive and not job.archive_checked:
        dispatch.check_import_archive(job_id=job.pk)
        return 1
    pending = list(job.chunks.filter(done=False).values_list("id", flat=True))
    for chunk_id in pending:
        dispatch.run_import_chunk(chunk_id=chunk_id)
    return len(pending)


@dataclass(frozen=True)
class ChunkResult:
    chunk_id: int
    ok: int
    rejected: int
    images_new: int
    already_done: bool  # a re-delivered task found its chunk committed: nothing was written again
    job_done: bool


def import_job_start(*, job: ImportJob) -> None:
    ImportJob.objects.filter(pk=job.pk, state=ImportJob.State.PENDING).update(
        state=ImportJob.State.RUNNING, started_at=timezone.now()
    )


def import_run_chunk(*, chunk_id: int) -> ChunkResult:
    """Import one chunk of rows in one transaction, exactly once.

    The chunk row is locked and marked done in the same transaction that writes its products and the job's
    counters, so a worker lost mid-chunk leaves nothing (the transaction aborts) and a re-delivered task for a
    committed chunk changes nothing.
    """
    chunk = ImportChunk.objects.select_related("job__merchant").get(pk=chunk_id)
    job = chunk.job
    if not chunk.done and job.archive and not job.archive_checked:
        import_archive_check(job_id=job.pk, enqueue=False)  # run inline, or delivered before the check: check now
        job.refresh_from_db()
    if job.state == ImportJob.State.FAILED:  # its zip was refused: nothing of it is imported
        return ChunkResult(chunk_id, 0, 0, 0, already_done=True, job_done=False)
    import_job_start(job=job)
    if not chunk.done and chunk.attempts >= IMPORT_CHUNK_MAX_ATTEMPTS:
        # Every earlier delivery died before it could commit or record a failure (killed worker, hard time limit).
        reason = (
            f"its import was started {chunk.attempts} times and never finished "
            "(the worker was killed or ran out of time, e.g. on a huge image or a slow image host)"
        )
        failed = import_chunk_fail(chunk_id=chunk_id, error=reason)
        chunk.refresh_from_db()
        return ChunkResult(chunk_id, chunk.ok, chunk.rejected, 0, already_done=not failed, job_done=_job_done(job))
    ImportChunk.objects.filter(pk=chunk_id, done=False).update(attempts=F("attempts") + 1)
    archive = None
    if job.archive:
        try:
            archive = SafeZip(job.archive.open("rb"))
        except (IntakeError, OSError):
            archive = None  # rows that need it are rejected with a clear error below
    fetched = _urls_prefetch([ManifestRow.from_json(data) for data in chunk.rows]) if not chunk.done else {}
    try:
        with transaction.atomic():
            chunk = ImportChunk.objects.select_for_update().get(pk=chunk_id)
            if chunk.done:
                dispatch.embed_images(image_ids=list(_chunk_pending_image_ids(chunk=chunk, merchant=job.merchant)))
                return ChunkResult(chunk_id, chunk.ok, chunk.rejected, 0, already_done=True, job_done=False)
            rows = [ManifestRow.from_json(data) for data in chunk.rows]
            imported = rows_import(merchant=job.merchant, rows=rows, archive=archive, fetched=fetched)
            errors = [error.to_json() for error in imported.errors]
            job_done = _chunk_commit(chunk=chunk, ok=imported.ok, errors=errors, images_new=len(imported.new_image_ids))
            dispatch.embed_images(image_ids=imported.new_image_ids)
            return ChunkResult(
                chunk_id, imported.ok, len(errors), len(imported.new_image_ids), already_done=False, job_done=job_done
            )
    finally:
        if archive is not None:
            archive.close()
            job.archive.close()  # the zip reader does not close a file object it was given


def import_chunk_fail(*, chunk_id: int, error: str) -> bool:
    """Give up on a chunk that keeps failing (after the task's retries): its rows are rejected with the reason,
    so the job still finishes with counts that add up and the merchant knows which rows to upload again.
    False if the chunk had committed after all."""
    with transaction.atomic():
        chunk = ImportChunk.objects.select_for_update().filter(pk=chunk_id).first()
        if chunk is None or chunk.done:
            return False
        message = f"not imported ({error[:300]}); upload this row again"
        errors = [{"line": row["line"], "sku": row["sku"], "error": message} for row in chunk.rows]
        _chunk_commit(chunk=chunk, ok=0, errors=errors, images_new=0)
    return True


def _job_done(job: ImportJob) -> bool:
    return ImportJob.objects.filter(pk=job.pk, state=ImportJob.State.DONE).exists()


def _chunk_commit(*, chunk: ImportChunk, ok: int, errors: list[dict[str, Any]], images_new: int) -> bool:
    """Mark a locked chunk done and add its outcome to the job's counters (same transaction); True when that
    finished the job."""
    errors.sort(key=lambda error: error["line"])
    chunk.done, chunk.ok, chunk.rejected, chunk.finished_at = True, ok, len(errors), timezone.now()
    chunk.errors = errors
    chunk.save(update_fields=["done", "ok", "rejected", "finished_at", "errors"])
    job = ImportJob.objects.select_for_update().get(pk=chunk.job_id)
    job.processed += len(chunk.rows)
    job.ok += ok
    job.rejected += len(errors)
    job.images_new += images_new
    job.chunks_done += 1
    fields = ["processed", "ok", "rejected", "images_new", "chunks_done"]
    job_done = job.chunks_done >= job.chunks_total
    if job_done:
        job.state, job.finished_at = ImportJob.State.DONE, timezone.now()
        fields += ["state", "finished_at"]
        if job.archive:  # every chunk has read its entries: the upload is no longer needed
            archive_name, storage = job.archive.name, job.archive.storage
            transaction.on_commit(lambda: storage.delete(archive_name))
            job.archive = ""
            fields.append("archive")
    job.save(update_fields=fields)
    return job_done


def _chunk_pending_image_ids(*, chunk: ImportChunk, merchant: Merchant) -> QuerySet[ProductImage, int]:
    """Images of a committed chunk still waiting for an embedding (the worker may have died between commit and
    queueing them): queueing them again is harmless, embedding is idempotent."""
    skus = [row["sku"] for row in chunk.rows]
    return ProductImage.objects.filter(
        product__merchant=merchant, product__sku__in=skus, status=ProductImage.Status.PENDING
    ).values_list("id", flat=True)


# --- manifest rows to products and images ---------------------------------------------------------------------------
Fetched = dict[str, bytes | IntakeError]  # image URL -> its bytes, or why it could not be fetched


@dataclass(frozen=True)
class RowsImported:
    ok: int
    errors: list[RowError]
    new_image_ids: list[int]  # stored by this import: to embed


@dataclass(frozen=True)
class _ImageFile:
    source_url: str  # "" for a zip entry
    sha256: str  # of the file as uploaded: the same file for the same product is stored once
    reference: str  # as the row names it: to read it (again) and for error messages


@dataclass(frozen=True)
class _StoredFile:
    """A validated image's re-encoded file, already written to storage: what a ProductImage row needs."""

    name: str
    width: int
    height: int
    size_bytes: int


def rows_import(
    *,
    merchant: Merchant,
    rows: Sequence[ManifestRow],
    archive: SafeZip | None,
    fetched: Fetched | None = None,
) -> RowsImported:
    """Write manifest rows as products and images, in a handful of statements for the lot. Call it inside a
    transaction (the chunk's).

    Every row's images are read and validated before its product is written, so a bad row is rejected whole;
    products are created or changed only where a field differs; an image the product already has (same sha256)
    is neither stored nor embedded again; a row that lists images makes them the product's image set (images no
    longer listed are removed, so search stops returning them).

    Images go one at a time: each is read, validated (decoded at full size, re-encoded) and its file written
    before the next is read, so the chunk holds one full-size picture at most, whatever its number of rows. The
    files of a row rejected later, or of a transaction that rolls back, are removed (or swept as orphans).
    """
    already_stored = _stored_digests(merchant=merchant, skus=[row.sku for row in rows])
    written: dict[str, _StoredFile] = {}
    errors: list[RowError] = []
    ready: list[tuple[ManifestRow, list[_ImageFile]]] = []
    for row in rows:
        files: list[_ImageFile] = []
        written_here: list[str] = []
        try:
            for reference in row.images:
                data = _file_read(reference, archive, fetched)
                file = _ImageFile(reference if is_image_url(reference) else "", hashlib.sha256(data).hexdigest(),
                                  reference)  # fmt: skip
                if file.sha256 not in already_stored.get(row.sku, ()) and file.sha256 not in written:
                    written[file.sha256] = _file_write(_image_validate(file, data))
                    written_here.append(file.sha256)
                files.append(file)
                del data
        except IntakeError as exc:
            for digest in written_here:  # this row's files, written for nothing
                ProductImage._meta.get_field("file").storage.delete(written.pop(digest).name)
            errors.append(RowError(row.line, row.sku, str(exc)))
            continue
        ready.append((row, files))
    upserted = products_upsert(merchant=merchant, values={row.sku: _row_product_values(row) for row, _ in ready})
    new_image_ids = _images_place(
        placements=[(upserted[row.sku].product, files) for row, files in ready if files],
        written=written,
        archive=archive,
        fetched=fetched,
    )
    return RowsImported(ok=len(ready), errors=errors, new_image_ids=new_image_ids)


def _file_write(validated: ValidatedImage) -> _StoredFile:
    name = image_file_write(validated=validated)
    return _StoredFile(name, validated.width, validated.height, len(validated.data))


def _row_product_values(row: ManifestRow) -> dict[str, Any]:
    """The one mapping from a manifest row to a product's fields."""
    return product_values(
        title=row.title,
        description=row.description,
        category=row.category,
        attributes=row.attributes,
        price=row.price,
        url=row.url,
        active=row.active,
    )


def _stored_digests(*, merchant: Merchant, skus: Sequence[str]) -> dict[str, set[str]]:
    """sku -> sha256 of the images its product already has. Read without locks, only to skip validating files
    already stored: what is written is decided again under the products' locks (`_images_place`)."""
    digests: dict[str, set[str]] = {}
    pairs = ProductImage.objects.filter(product__merchant=merchant, product__sku__in=list(skus))
    for sku, digest in pairs.values_list("product__sku", "sha256"):
        digests.setdefault(sku, set()).add(digest)
    return digests


def _images_place(
    *,
    placements: Sequence[tuple[Product, list[_ImageFile]]],
    written: dict[str, _StoredFile],
    archive: SafeZip | None,
    fetched: Fetched | None,
) -> list[int]:
    """Make each (locked) product's images exactly `files`, in that order: store the new ones, move the ones whose
    position changed, delete the ones no longer listed. Returns the ids of the images stored."""
    stored: dict[int, dict[str, ProductImage]] = {}
    for image in ProductImage.objects.filter(product__in=[product for product, _ in placements]):
        stored.setdefault(image.product_id, {})[image.sha256] = image
    new_images: list[ProductImage] = []
    moved: list[ProductImage] = []
    stale: list[ProductImage] = []
    for product, files in placements:
        have = stored.get(product.pk, {})
        keep: dict[str, ProductImage] = {}
        for position, file in enumerate(files):
            image = have.get(file.sha256) or keep.get(file.sha256)
            if image is None:
                stored_file = written.get(file.sha256)
                if stored_file is None:  # not written above only if it was stored then and deleted since
                    data = _file_read(file.reference, archive, fetched)
                    stored_file = written[file.sha256] = _file_write(_image_validate(file, data))
                # Two products of the chunk with the same file share it: a file is deleted only once no row names it.
                image = ProductImage(
                    product_id=product.pk, file=stored_file.name, width=stored_file.width, height=stored_file.height,
                    sha256=file.sha256, size_bytes=stored_file.size_bytes, position=position,
                    source_url=file.source_url,
                )  # fmt: skip
                new_images.append(image)
            elif image.position != position:
                image.position = position
                if image.pk:
                    moved.append(image)
            keep[file.sha256] = image
        stale.extend(image for digest, image in have.items() if digest not in keep)
    ProductImage.objects.bulk_create(new_images)
    if moved:
        ProductImage.objects.bulk_update(moved, ["position"])
    for image in stale:
        image_delete(image=image)
    return [image.pk for image in new_images]


def _image_validate(file: _ImageFile, data: bytes) -> ValidatedImage:
    try:
        return image_validate(data)
    except IntakeError as exc:
        raise IntakeError(f"image {file.reference}: {exc}") from exc


def _urls_prefetch(rows: Sequence[ManifestRow]) -> Fetched:
    """Fetch every image URL of a chunk in parallel, before its transaction opens (no lock waits on the network)."""
    urls = sorted({reference for row in rows for reference in row.images if is_image_url(reference)})
    if not urls:
        return {}

    def fetch(url: str) -> bytes | IntakeError:
        try:
            return image_fetch(url=url)
        except IntakeError as exc:
            return exc

    pool = ThreadPoolExecutor(max_workers=min(URL_FETCH_THREADS, len(urls)))
    try:
        futures = [pool.submit(fetch, url) for url in urls]
        return {url: future.result() for url, future in zip(urls, futures)}
    finally:
        # On success every future is done. On the task's soft time limit (raised here, in this thread), fetches not
        # started are cancelled and the running ones are not waited for: each ends within its own deadline.
        pool.shutdown(wait=False, cancel_futures=True)


def _file_read(reference: str, archive: SafeZip | None, fetched: Fetched | None) -> bytes:
    """One image file of a row, read under the zip caps or fetched under the URL policy (prefetched if possible)."""
    if is_image_url(reference):
        try:
            data = fetched.get(reference) if fetched else None
            if isinstance(data, IntakeError):
                raise data
            return data if data is not None else image_fetch(url=reference)
        except IntakeError as exc:
            raise IntakeError(f"image {reference}: {exc}") from exc
    if archive is None:
        raise IntakeError(f"image {reference!r}: the import's zip is gone")
    return archive.read(reference)
