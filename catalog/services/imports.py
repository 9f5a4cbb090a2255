"""Catalog imports: an uploaded manifest (and zip of images) becomes an import job whose chunks the embed workers
run, each exactly once, in one transaction that writes its products, images and the job's counters."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.core.files import File
from django.db import IntegrityError, transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from catalog import dispatch, intake
from catalog.models import ImportChunk, ImportJob, Merchant, Product, ProductImage
from catalog.services.products import (
    PRODUCT_FIELDS,
    image_add,
    image_delete,
    image_fetch,
    image_store,
    product_upsert,
    product_values,
)

# ~1 s of work per task (a lost worker redoes little); embed batches stay full
IMPORT_CHUNK_ROWS = 3 * dispatch.EMBED_CHUNK

IMPORT_ROW_RETRIES = 1  # a concurrent import may create the same sku between our read and insert: retry once

URL_FETCH_THREADS = 8  # image hosts answer in parallel: a chunk waits for its slowest fetch, not for their sum

URL_CHUNK_ROWS = 24  # chunks with image URLs: even with slow hosts their fetches stay well inside the time limit


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

    The manifest and the zip are parsed and read completely first: a file-level problem (not a manifest, a zip
    slip, a zip bomb) raises intake.IntakeError and stores nothing. Row-level problems become rejected rows with
    their line numbers, counted at once; good rows are split into chunks of `chunk_rows`. With `enqueue=False`
    the caller runs the chunks itself (`import_run_chunk`, e.g. `import_catalog --inline`).
    """
    parsed = intake.manifest_parse(manifest, filename=manifest_name, manifest_format=manifest_format)
    errors = list(parsed.errors)
    rows: list[intake.ManifestRow] = []
    safe_zip: intake.SafeZip | None = None
    if archive is not None:
        archive.seek(0)
        intake.zip_check(archive)
        archive.seek(0)
        safe_zip = intake.SafeZip(archive)
    for row in parsed.rows:
        resolved, missing = [], []
        for reference in row.images:
            if intake.is_image_url(reference):
                resolved.append(reference)
            elif safe_zip is not None and (name := safe_zip.resolve(reference)) is not None:
                resolved.append(name)
            else:
                missing.append(reference)
        if missing:
            where = "the zip" if safe_zip is not None else "the upload (no zip of images was given)"
            errors.append(intake.RowError(row.line, row.sku, f"image {missing[0]!r} is not in {where}"))
        else:
            rows.append(dataclasses.replace(row, images=tuple(resolved)))
    if safe_zip is not None:
        safe_zip.close()
    errors.sort(key=lambda error: error.line)

    if any(intake.is_image_url(reference) for row in rows for reference in row.images):
        chunk_rows = min(chunk_rows, URL_CHUNK_ROWS)
    chunk_rows = max(1, chunk_rows)
    chunks = [rows[start : start + chunk_rows] for start in range(0, len(rows), chunk_rows)]
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
        for chunk_row in created if enqueue else ():
            dispatch.run_import_chunk(chunk_id=chunk_row.pk)
    return job


def import_job_resume(*, job: ImportJob) -> int:
    """Queue again every chunk of `job` not yet committed (after a broker lost its messages); returns how many.
    Safe at any time: a chunk that is running or done is skipped by its own lock and flag."""
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
    committed chunk changes nothing. Each row runs in a savepoint: a bad row is rejected whole, with its line.
    """
    chunk = ImportChunk.objects.select_related("job__merchant").get(pk=chunk_id)
    job = chunk.job
    import_job_start(job=job)
    ImportChunk.objects.filter(pk=chunk_id, done=False).update(attempts=F("attempts") + 1)
    archive = None
    if job.archive:
        try:
            archive = intake.SafeZip(job.archive.open("rb"))
        except (intake.IntakeError, OSError):
            archive = None  # rows that need it are rejected with a clear error below
    fetched = _urls_prefetch([intake.ManifestRow.from_json(data) for data in chunk.rows]) if not chunk.done else {}
    try:
        with transaction.atomic():
            chunk = ImportChunk.objects.select_for_update().get(pk=chunk_id)
            if chunk.done:
                dispatch.embed_images(image_ids=list(_chunk_pending_image_ids(chunk=chunk, merchant=job.merchant)))
                return ChunkResult(chunk_id, chunk.ok, chunk.rejected, 0, already_done=True, job_done=False)
            rows = [intake.ManifestRow.from_json(data) for data in chunk.rows]
            bulk = _chunk_import_bulk(merchant=job.merchant, rows=rows, archive=archive, fetched=fetched)
            if bulk is not None:
                ok, errors, new_ids = bulk.ok, [error.to_json() for error in bulk.errors], bulk.new_image_ids
            else:  # a concurrent writer got in the way: row by row, each in its own savepoint, with retries
                ok, errors, new_ids = 0, [], []
                for row in rows:
                    outcome = _chunk_row(merchant=job.merchant, row=row, archive=archive, fetched=fetched)
                    if isinstance(outcome, intake.RowError):
                        errors.append(outcome.to_json())
                    else:
                        ok += 1
                        new_ids.extend(outcome.new_image_ids)
            job_done = _chunk_commit(chunk=chunk, ok=ok, errors=errors, images_new=len(new_ids))
            dispatch.embed_images(image_ids=new_ids)
            return ChunkResult(chunk_id, ok, len(errors), len(new_ids), already_done=False, job_done=job_done)
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


@dataclass(frozen=True)
class _RowOutcome:
    new_image_ids: list[int]


Fetched = dict[str, bytes | intake.IntakeError]  # image URL -> its bytes, or why it could not be fetched


def _urls_prefetch(rows: Sequence[intake.ManifestRow]) -> Fetched:
    """Fetch every image URL of a chunk in parallel, before its transaction opens (no lock waits on the network)."""
    urls = sorted({reference for row in rows for reference in row.images if intake.is_image_url(reference)})
    if not urls:
        return {}

    def fetch(url: str) -> bytes | intake.IntakeError:
        try:
            return image_fetch(url=url)
        except intake.IntakeError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=min(URL_FETCH_THREADS, len(urls))) as pool:
        return dict(zip(urls, pool.map(fetch, urls)))


def _row_images(
    row: intake.ManifestRow, archive: intake.SafeZip | None, fetched: Fetched | None = None
) -> list[tuple[bytes, str]]:
    """The row's image files as (bytes, source URL), read under the zip caps or fetched under the URL policy."""
    files = []
    for reference in row.images:
        if intake.is_image_url(reference):
            try:
                data = fetched.get(reference) if fetched else None
                if isinstance(data, intake.IntakeError):
                    raise data
                files.append((data if data is not None else image_fetch(url=reference), reference))
            except intake.IntakeError as exc:
                raise intake.IntakeError(f"image {reference}: {exc}") from exc
        else:
            if archive is None:
                raise intake.IntakeError(f"image {reference!r}: the import's zip is gone")
            files.append((archive.read(reference), ""))
    return files


@dataclass(frozen=True)
class _BulkOutcome:
    ok: int
    errors: list[intake.RowError]
    new_image_ids: list[int]


def _chunk_import_bulk(
    *,
    merchant: Merchant,
    rows: Sequence[intake.ManifestRow],
    archive: intake.SafeZip | None,
    fetched: Fetched | None = None,
) -> _BulkOutcome | None:
    """`_row_import` for a whole chunk in a handful of statements instead of several per row.

    Same semantics: every row's images are read and validated before anything is written, so a bad row is
    rejected whole; products are created or changed only where a field differs; an image already stored for the
    product (same sha256) is neither stored nor re-embedded again; listed images replace unlisted ones. Returns
    None (having written nothing) if a concurrent writer created one of these rows meanwhile.
    """
    errors: list[intake.RowError] = []
    prepared: list[tuple[intake.ManifestRow, list[tuple[bytes, str, str]]]] = []
    for row in rows:
        try:
            files = _row_images(row, archive, fetched)
        except intake.IntakeError as exc:
            errors.append(intake.RowError(row.line, row.sku, str(exc)))
            continue
        prepared.append((row, [(data, url, hashlib.sha256(data).hexdigest()) for data, url in files]))

    products = {
        product.sku: product
        for product in Product.objects.select_for_update().filter(
            merchant=merchant, sku__in=[r.sku for r, _ in prepared]
        )
    }
    stored: dict[int, dict[str, ProductImage]] = {}
    for image in ProductImage.objects.filter(product__in=list(products.values())):
        stored.setdefault(image.product_id, {})[image.sha256] = image

    ready = []
    for row, hashed in prepared:
        product = products.get(row.sku)
        have = stored.get(product.pk, {}) if product else {}
        validated: dict[str, intake.ValidatedImage] = {}
        try:
            for position, (data, url, digest) in enumerate(hashed):
                if digest not in have and digest not in validated:
                    try:
                        validated[digest] = intake.image_validate(data)
                    except intake.IntakeError as exc:
                        raise intake.IntakeError(f"image {url or row.images[position]}: {exc}") from exc
        except intake.IntakeError as exc:
            errors.append(intake.RowError(row.line, row.sku, str(exc)))
            continue
        ready.append((row, hashed, validated))

    try:
        with transaction.atomic():
            new_ids = _bulk_write(merchant=merchant, ready=ready, products=products, stored=stored)
    except IntegrityError:
        return None
    return _BulkOutcome(ok=len(ready), errors=errors, new_image_ids=new_ids)


def _bulk_write(
    *,
    merchant: Merchant,
    ready: list[tuple[intake.ManifestRow, list[tuple[bytes, str, str]], dict[str, intake.ValidatedImage]]],
    products: dict[str, Product],
    stored: dict[int, dict[str, ProductImage]],
) -> list[int]:
    now = timezone.now()
    created, changed, changed_fields = [], [], set()
    for row, _, _ in ready:
        values = product_values(
            title=row.title,
            description=row.description,
            category=row.category,
            attributes=row.attributes,
            price=None if row.price is None else Decimal(row.price),
            url=row.url,
            active=row.active,
        )
        product = products.get(row.sku)
        if product is None:
            products[row.sku] = product = Product(merchant=merchant, sku=row.sku, **values)
            created.append(product)
            continue
        differing = [name for name in PRODUCT_FIELDS if getattr(product, name) != values[name]]
        if differing:
            for name in differing:
                setattr(product, name, values[name])
            product.updated_at = now
            changed.append(product)
            changed_fields.update(differing)
    Product.objects.bulk_create(created)  # PostgreSQL returns the new ids
    if changed:
        Product.objects.bulk_update(changed, [*sorted(changed_fields), "updated_at"])

    new_images: list[ProductImage] = []
    moved: list[ProductImage] = []
    stale: list[ProductImage] = []
    for row, files, validated in ready:
        product = products[row.sku]
        have = stored.get(product.pk, {})
        keep: dict[str, ProductImage] = {}
        for position, (_, url, digest) in enumerate(files):
            image = have.get(digest) or keep.get(digest)
            if image is None:
                image = image_store(
                    product_id=product.pk, validated=validated[digest], position=position, source_url=url
                )
                new_images.append(image)
            elif image.position != position:
                image.position = position
                if image.pk:
                    moved.append(image)
            keep[digest] = image
        if files:
            stale.extend(image for digest, image in have.items() if digest not in keep)
    ProductImage.objects.bulk_create(new_images)
    if moved:
        ProductImage.objects.bulk_update(moved, ["position"])
    for image in stale:
        image_delete(image=image)
    return [image.pk for image in new_images]


def _chunk_row(
    *, merchant: Merchant, row: intake.ManifestRow, archive: intake.SafeZip | None, fetched: Fetched | None = None
) -> _RowOutcome | intake.RowError:
    try:
        files = _row_images(row, archive, fetched)
    except intake.IntakeError as exc:
        return intake.RowError(row.line, row.sku, str(exc))
    for attempt in range(IMPORT_ROW_RETRIES + 1):
        try:
            with transaction.atomic():
                return _row_import(merchant=merchant, row=row, files=files)
        except intake.IntakeError as exc:
            return intake.RowError(row.line, row.sku, str(exc))
        except IntegrityError as exc:
            if attempt == IMPORT_ROW_RETRIES:
                return intake.RowError(row.line, row.sku, f"conflicting concurrent write: {exc}"[:500])
    raise AssertionError("unreachable")


def _row_import(*, merchant: Merchant, row: intake.ManifestRow, files: list[tuple[bytes, str]]) -> _RowOutcome:
    """One manifest row: upsert the product, add its images; with images listed, they become the product's
    image set (images no longer listed are removed, so search stops returning them)."""
    result = product_upsert(
        merchant=merchant,
        sku=row.sku,
        title=row.title,
        description=row.description,
        category=row.category,
        attributes=row.attributes,
        price=None if row.price is None else Decimal(row.price),
        url=row.url,
        active=row.active,
    )
    new_ids, keep = [], []
    for position, (data, source_url) in enumerate(files):
        try:
            added = image_add(
                product=result.product, data=data, position=position, source_url=source_url, enqueue=False
            )
        except intake.IntakeError as exc:
            name = source_url or row.images[position]
            raise intake.IntakeError(f"image {name}: {exc}") from exc
        keep.append(added.image.pk)
        if added.created:
            new_ids.append(added.image.pk)
    if files:
        for stale in ProductImage.objects.filter(product=result.product).exclude(pk__in=keep):
            image_delete(image=stale)
    return _RowOutcome(new_ids)
