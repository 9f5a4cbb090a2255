"""Writes. Keyword-only, typed; the one place where catalog rows change (views and tasks call these)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile, File
from django.db import IntegrityError, connection, transaction
from django.db.models import F, QuerySet
from django.utils import timezone
from PIL import Image

from catalog import dispatch, intake, query_payload, selectors
from catalog.codes import bits_to_bitstring, code_index_create_sql, code_sql, version_sql
from catalog.models import (
    DuplicateFinding,
    ImageEmbedding,
    ImportChunk,
    ImportJob,
    IndexChange,
    Merchant,
    ModelVersion,
    Product,
    ProductImage,
    TrainingRun,
)

logger = logging.getLogger(__name__)

BASELINE_FIT_SAMPLE = 3000  # PCA/ITQ are stable well before this; more only costs fitting time
ATTRIBUTE_REPORT_THRESHOLD = 0.5  # predicted attributes kept on an embedding (independent sigmoids)
CATEGORY_TOP = 5  # category probabilities returned with a query encoding

# `encoder_for(checkpoint path) -> workers.ml.encoder.Encoder`, passed in by the worker's task so that this
# module (imported by web processes too) never imports torch.
EncoderFor = Callable[[str | Path], Any]


@dataclass(frozen=True)
class UpsertResult:
    product: Product
    created: bool
    changed: bool  # False when the same data was written again (idempotent re-upload)


PRODUCT_FIELDS = ("title", "description", "category", "attributes", "price", "url", "active")


def product_upsert(
    *,
    merchant: Merchant,
    sku: str,
    title: str,
    description: str = "",
    category: str = "",
    attributes: Sequence[str] = (),
    price: Decimal | None = None,
    url: str = "",
    active: bool = True,
) -> UpsertResult:
    """Create or update the product (merchant, sku); writes nothing when nothing changed."""
    values = product_values(
        title=title,
        description=description,
        category=category,
        attributes=attributes,
        price=price,
        url=url,
        active=active,
    )
    with transaction.atomic():
        product = Product.objects.select_for_update().filter(merchant=merchant, sku=sku).first()
        if product is None:
            return UpsertResult(Product.objects.create(merchant=merchant, sku=sku, **values), True, True)
        changed = [name for name in PRODUCT_FIELDS if getattr(product, name) != values[name]]
        for name in changed:
            setattr(product, name, values[name])
        if changed:
            product.save(update_fields=[*changed, "updated_at"])
        return UpsertResult(product, False, bool(changed))


def product_values(
    *,
    title: str,
    description: str = "",
    category: str = "",
    attributes: Sequence[str] = (),
    price: Decimal | None = None,
    url: str = "",
    active: bool = True,
) -> dict[str, Any]:
    """A product's PRODUCT_FIELDS in stored form: what `product_upsert` compares and writes."""
    return {
        "title": title,
        "description": description,
        "category": category,
        "attributes": sorted(set(attributes)),
        "price": None if price is None else Decimal(price).quantize(Decimal("0.01")),
        "url": url,
        "active": active,
    }


@dataclass(frozen=True)
class ImageAddResult:
    image: ProductImage
    created: bool  # False: this product already had this exact file (same sha256): nothing stored or re-embedded


def image_add(
    *, product: Product, data: bytes, position: int = 0, source_url: str = "", enqueue: bool = True
) -> ImageAddResult:
    """Validate an untrusted image, store its re-encoded copy and queue its embedding (after commit).

    Idempotent on the sha256 of the uploaded bytes: the same file for the same product is neither stored again
    nor re-embedded (nor even decoded again: it was validated when first stored). Raises intake.IntakeError for
    unusable input (nothing is stored then). `enqueue=False` leaves queueing to a caller that batches many adds.
    """
    existing = ProductImage.objects.filter(product=product, sha256=hashlib.sha256(data).hexdigest()).first()
    if existing is not None:
        if existing.position != position:
            existing.position = position
            existing.save(update_fields=["position"])
        return ImageAddResult(existing, False)
    image = image_store(
        product_id=product.pk, validated=intake.image_validate(data), position=position, source_url=source_url
    )
    image.save()
    if enqueue:
        dispatch.embed_images(image_ids=[image.pk])
    return ImageAddResult(image, True)


def image_store(
    *, product_id: int, validated: intake.ValidatedImage, position: int = 0, source_url: str = ""
) -> ProductImage:
    """Write a validated image's re-encoded file to storage; returns the (unsaved) row that points at it.

    Dimensions come from the validation, so the ImageField does not open the file again to read them."""
    field = ProductImage._meta.get_field("file")
    name = field.generate_filename(None, f"{validated.sha256[:32]}.{validated.extension}")
    stored = field.storage.save(name, ContentFile(validated.data))
    return ProductImage(
        product_id=product_id,
        file=stored,
        width=validated.width,
        height=validated.height,
        sha256=validated.sha256,
        size_bytes=len(validated.data),
        position=position,
        source_url=source_url,
    )


def code_index_ensure(*, version: ModelVersion) -> None:
    """Create the version's HNSW index on its codes unless it exists (catalog.codes says why one per version)."""
    with connection.cursor() as cursor:
        cursor.execute(code_index_create_sql(version_id=version.pk, code_bits=version.code_bits))


def model_version_activate(*, version: ModelVersion) -> ModelVersion:
    """Make `version` the one search reads, atomically: the previous active version is retired in the same
    transaction, and the partial unique constraint rejects any concurrent second activation."""
    code_index_ensure(version=version)
    with transaction.atomic():
        ModelVersion.objects.select_for_update().filter(status=ModelVersion.Status.ACTIVE).exclude(
            pk=version.pk
        ).update(status=ModelVersion.Status.RETIRED)
        version.status = ModelVersion.Status.ACTIVE
        version.activated_at = timezone.now()
        version.save(update_fields=["status", "activated_at"])
    return version


def embedding_row(
    *,
    image: ProductImage,
    model_version: ModelVersion,
    bits: np.ndarray,
    fc7: np.ndarray,
    category: str = "",
    category_confidence: float | None = None,
    attributes: dict[str, float] | None = None,
    landmarks: Sequence[Sequence[float]] | None = None,
) -> ImageEmbedding:
    """An unsaved embedding row of `image` under `model_version` (sizes are checked when it is saved)."""
    return ImageEmbedding(
        image=image,
        model_version=model_version,
        product_id=image.product_id,
        code=bits_to_bitstring(bits),
        fc7=np.asarray(fc7, dtype=np.float32).reshape(-1),
        category=category,
        category_confidence=category_confidence,
        attributes=attributes or {},
        landmarks=[list(map(float, point)) for point in (landmarks or [])],
    )


def embedding_save(
    *,
    image: ProductImage,
    model_version: ModelVersion,
    bits: np.ndarray,
    fc7: np.ndarray,
    **predictions: Any,  # category, category_confidence, attributes, landmarks: see embedding_row
) -> ImageEmbedding:
    """Insert or replace one embedding (idempotent: re-embedding is an update)."""
    row = embedding_row(image=image, model_version=model_version, bits=bits, fc7=fc7, **predictions)
    embeddings_bulk_save(model_version=model_version, rows=[row])
    return row


def checkpoint_path(version: ModelVersion) -> Path:
    path = Path(version.checkpoint)
    return path if path.is_absolute() else Path(settings.MODELS_DIR) / path


def image_open(image: ProductImage) -> Image.Image:
    """A stored product image as RGB (it was validated and re-encoded at intake)."""
    with image.file.open("rb") as handle:
        return Image.open(io.BytesIO(handle.read())).convert("RGB")


def _predictions(encoding: Any, index: int, label_space: Any) -> dict[str, Any]:
    """The per-image predictions of an Encoding, as stored on an embedding and shown in explanations."""
    result: dict[str, Any] = {"category": "", "category_confidence": None, "attributes": {}, "landmarks": []}
    if encoding.category_probs is not None and label_space.categories:
        probs = encoding.category_probs[index]
        best = int(np.argmax(probs))
        result["category"] = label_space.categories[best]
        result["category_confidence"] = float(probs[best])
    if encoding.attribute_probs is not None and label_space.attributes:
        result["attributes"] = {
            name: round(float(p), 4)
            for name, p in zip(label_space.attributes, encoding.attribute_probs[index])
            if p >= ATTRIBUTE_REPORT_THRESHOLD
        }
    if encoding.landmarks is not None:
        visibility = (
            encoding.visibility[index] if encoding.visibility is not None else np.ones(len(encoding.landmarks[index]))
        )
        result["landmarks"] = [
            [round(float(x), 4), round(float(y), 4), round(float(v), 4)]
            for (x, y), v in zip(encoding.landmarks[index], visibility)
        ]
    return result


def images_embed(*, image_ids: Sequence[int], encoder_for: EncoderFor) -> dict[str, Any]:
    """Embed images under every serving version; images that cannot be decoded are marked failed, not retried."""
    versions = list(selectors.model_versions_serving())
    images = list(ProductImage.objects.filter(id__in=image_ids))
    loaded: list[tuple[ProductImage, Image.Image]] = []
    failed = 0
    for image in images:
        try:
            loaded.append((image, image_open(image)))
        except Exception as exc:  # a broken stored file must not block the rest of the batch
            failed += 1
            ProductImage.objects.filter(pk=image.pk).update(status=ProductImage.Status.FAILED, error=str(exc)[:500])
    if not versions or not loaded:
        return {"embedded": 0, "failed": failed, "versions": [v.pk for v in versions]}
    duplicates = 0
    for version in versions:
        encoder = encoder_for(checkpoint_path(version))
        encoding = encoder.encode([pil for _, pil in loaded])
        with transaction.atomic():
            embeddings_bulk_save(
                model_version=version,
                rows=[
                    embedding_row(
                        image=image,
                        model_version=version,
                        bits=encoding.bits[index],
                        fc7=encoding.fc7[index],
                        **_predictions(encoding, index, encoder.label_space),
                    )
                    for index, (image, _) in enumerate(loaded)
                ],
            )
            duplicates += duplicates_find(model_version=version, image_ids=[image.pk for image, _ in loaded])
    ProductImage.objects.filter(pk__in=[image.pk for image, _ in loaded]).update(
        status=ProductImage.Status.EMBEDDED, error=""
    )
    return {"embedded": len(loaded), "failed": failed, "versions": [v.pk for v in versions], "duplicates": duplicates}


def embeddings_bulk_save(*, model_version: ModelVersion, rows: Sequence[ImageEmbedding]) -> None:
    """Insert or replace many embeddings of one version in one statement (embedding_save's semantics, batched:
    one round trip per batch instead of two or three per image)."""
    for row in rows:
        if len(row.code) != model_version.code_bits or len(row.fc7) != model_version.fc7_dim:
            raise ValueError(
                f"version {model_version.pk} expects {model_version.code_bits} bits and {model_version.fc7_dim}-d fc7,"
                f" got {len(row.code)} bits and {len(row.fc7)}-d"
            )
    ImageEmbedding.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["image", "model_version"],
        update_fields=["product", "code", "fc7", "category", "category_confidence", "attributes", "landmarks"],
    )


def query_encode(*, data: bytes, version: ModelVersion, encoder_for: EncoderFor) -> dict[str, Any]:
    """Encode one validated query photo; plain JSON for the trip back through the result backend."""
    encoder = encoder_for(checkpoint_path(version))
    encoding = encoder.encode([Image.open(io.BytesIO(data)).convert("RGB")])
    labels = encoder.label_space
    category_probs = {}
    if encoding.category_probs is not None and labels.categories:
        order = np.argsort(-encoding.category_probs[0])[:CATEGORY_TOP]
        category_probs = {labels.categories[i]: float(encoding.category_probs[0][i]) for i in order}
    return query_payload.encoding_to_message(
        model_version_id=version.pk,
        bits=encoding.bits[0],
        fc7=encoding.fc7[0],
        category_probs=category_probs,
        **_predictions(encoding, 0, labels),
    )


def model_version_bootstrap(*, name: str = "v0-baseline", code_bits: int = 64, fc7_dim: int = 256) -> ModelVersion:
    """Make sure a shop can search before anyone trains: if no version is active or on its way, fit version 0
    (pretrained backbone + PCA + ITQ) on the catalog in the background. Returns the version that will serve."""
    serving = ModelVersion.objects.filter(
        status__in=[ModelVersion.Status.ACTIVE, ModelVersion.Status.INDEXING, ModelVersion.Status.TRAINING]
    ).first()
    if serving:
        return serving

    version = ModelVersion.objects.create(
        name=name if not ModelVersion.objects.filter(name=name).exists() else f"{name}-{timezone.now():%Y%m%d%H%M%S}",
        kind=ModelVersion.Kind.BASELINE,
        status=ModelVersion.Status.TRAINING,
        code_bits=code_bits,
        fc7_dim=fc7_dim,
    )
    dispatch.fit_baseline(version_id=version.pk)
    return version


def model_version_fit_baseline(
    *, version: ModelVersion, fit: Callable[..., Path], encoder_for: EncoderFor
) -> ModelVersion:
    """Fit version 0 on a sample of the catalog's images, then start indexing the catalog with it."""
    images = list(
        ProductImage.objects.exclude(status=ProductImage.Status.FAILED)
        .select_related("product")
        .order_by("id")[:BASELINE_FIT_SAMPLE]
    )
    pictures, categories = [], []
    for image in images:
        try:
            pictures.append(image_open(image))
            categories.append(image.product.category or None)
        except Exception:
            logger.warning("skipping unreadable image %s in baseline fit", image.pk)
    out_path = Path(settings.MODELS_DIR) / f"{version.name}-{version.pk}.pt"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = fit(
            pictures, out_path=out_path, categories=categories, code_bits=version.code_bits, fc7_dim=version.fc7_dim
        )
    except Exception as exc:
        version.status = ModelVersion.Status.FAILED
        version.metrics = {"error": str(exc)[:1000]}
        version.save(update_fields=["status", "metrics"])
        raise
    encoder = encoder_for(path)  # the fitted checkpoint's real sizes (fc7 may be clamped to the sample)
    version.checkpoint = str(path)
    version.fc7_dim = encoder.fc7_dim
    version.code_bits = encoder.code_bits
    version.config = encoder.version_info
    version.status = ModelVersion.Status.READY
    version.save()
    return model_version_start_indexing(version=version)


SWITCHABLE_STATUSES = (ModelVersion.Status.READY, ModelVersion.Status.RETIRED)


def model_version_switch(*, version: ModelVersion) -> ModelVersion:
    """An admin's "use this version": a trained (ready) version, or a retired one to roll back to. Search keeps
    the current version until `version` has embedded every image, then switches atomically."""
    if version.status not in SWITCHABLE_STATUSES:
        raise ValueError(f"{version.name} is {version.status}; only a ready or retired version can be switched to")
    if not version.checkpoint:
        raise ValueError(f"{version.name} has no checkpoint")
    busy = ModelVersion.objects.filter(status=ModelVersion.Status.INDEXING).exclude(pk=version.pk).first()
    if busy is not None:
        raise ValueError(f"{busy.name} is still being indexed; switch when it is done")
    return model_version_start_indexing(version=version)


def model_version_start_indexing(*, version: ModelVersion) -> ModelVersion:
    """Embed the whole catalog with `version` in the background; it becomes active when that is complete."""
    code_index_ensure(version=version)
    with transaction.atomic():
        version.status = ModelVersion.Status.INDEXING
        version.save(update_fields=["status"])
        dispatch.embed_images(
            image_ids=list(selectors.images_missing_embedding(version=version).values_list("id", flat=True))
        )
        dispatch.finish_indexing(version_id=version.pk)
    return version


def model_version_finish_indexing(*, version: ModelVersion) -> bool:
    """Activate `version` if every image has its embedding (the atomic switch); False if not yet."""
    if selectors.images_missing_embedding(version=version).exists():
        return False
    model_version_activate(version=version)
    return True


# --- Catalog ingest: import jobs, chunks, updates, deletes, duplicates -------------------------------------------

# ~1 s of work per task (a lost worker redoes little); embed batches stay full
IMPORT_CHUNK_ROWS = 3 * dispatch.EMBED_CHUNK
IMPORT_ROW_RETRIES = 1  # a concurrent import may create the same sku between our read and insert: retry once
URL_FETCH_THREADS = 8  # image hosts answer in parallel: a chunk waits for its slowest fetch, not for their sum
URL_CHUNK_ROWS = 24  # chunks with image URLs: even with slow hosts their fetches stay well inside the time limit
# Near-identical = both thresholds. Measured with version 0 on 2,000 distinct rendered products (2M pairs): no
# distinct pair passes, while exact copies, 98% of resized copies and ~25% of JPEG re-compressions (q50-70) do;
# at fc7 0.20 re-compressions rise to ~50% but distinct pairs start to pass. A wrong "copy" costs more than a miss.
DUPLICATE_MAX_HAMMING_FRACTION = 0.10  # codes of copies differ in <=5 of 64 bits at p95; codes alone collide
DUPLICATE_MAX_FC7_DISTANCE = 0.15  # L2 between unit fc7 vectors; nearest distinct product: p1 0.35, min 0.25
# Nearest codes examined per new image: a copy is within 1-2 bits, but 64-bit codes of distinct products crowd that
# radius too (~3 neighbours within 2 bits at p95 in 2,000 products, ~15 expected at 10,000), so look past it. At 64
# the planner left the HNSW index for a scan + sort per image (10 ms/image at 10k images, against 0.4 ms at 32).
DUPLICATE_CANDIDATES = 32


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


@dataclass(frozen=True)
class ChunkResult:
    chunk_id: int
    ok: int
    rejected: int
    images_new: int
    already_done: bool  # a re-delivered task found its chunk committed: nothing was written again
    job_done: bool


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


def _chunk_pending_image_ids(*, chunk: ImportChunk, merchant: Merchant) -> QuerySet[ProductImage, int]:
    """Images of a committed chunk still waiting for an embedding (the worker may have died between commit and
    queueing them): queueing them again is harmless, embedding is idempotent."""
    skus = [row["sku"] for row in chunk.rows]
    return ProductImage.objects.filter(
        product__merchant=merchant, product__sku__in=skus, status=ProductImage.Status.PENDING
    ).values_list("id", flat=True)


def import_job_resume(*, job: ImportJob) -> int:
    """Queue again every chunk of `job` not yet committed (after a broker lost its messages); returns how many.
    Safe at any time: a chunk that is running or done is skipped by its own lock and flag."""
    pending = list(job.chunks.filter(done=False).values_list("id", flat=True))
    for chunk_id in pending:
        dispatch.run_import_chunk(chunk_id=chunk_id)
    return len(pending)


def product_update(*, product: Product, **fields: Any) -> Product:
    """Change some of a product's fields (PRODUCT_FIELDS); deactivating it hides it from search at once (the
    IndexChange trigger records the change for the in-memory indexes)."""
    unknown = set(fields) - set(PRODUCT_FIELDS)
    if unknown:
        raise ValueError(f"not product fields: {sorted(unknown)}")
    current = {name: getattr(product, name) for name in PRODUCT_FIELDS}
    merged = {**current, **fields}
    return product_upsert(merchant=product.merchant, sku=product.sku, **merged).product


def product_delete(*, product: Product) -> None:
    """Delete a product, its images, embeddings and findings (cascade; the trigger records the deletion), and
    its stored files once the deletion has committed."""
    names = list(product.images.values_list("file", flat=True))
    product.delete()
    transaction.on_commit(lambda: _files_delete(names))


def image_delete(*, image: ProductImage) -> None:
    name = image.file.name
    image.delete()
    transaction.on_commit(lambda: _files_delete([name]))


def _files_delete(names: Sequence[str]) -> None:
    storage = ProductImage._meta.get_field("file").storage
    for name in names:
        # Another product may hold the same bytes under another name, never under this one: safe to remove.
        if name and not ProductImage.objects.filter(file=name).exists():
            storage.delete(name)


def duplicates_find(*, model_version: ModelVersion, image_ids: Sequence[int]) -> int:
    """Record near-identical images of other products for these images' embeddings under `model_version`.

    Candidates come from the version's Hamming index (nearest codes), then both thresholds must hold. A finding
    is stored in both directions so each merchant sees it about its own image. Returns findings created.
    """
    if not image_ids:
        return 0
    bits = int(model_version.code_bits)
    max_hamming = int(bits * DUPLICATE_MAX_HAMMING_FRACTION)
    # The partial HNSW index (code_index_ensure) serves only the exact expressions catalog.codes writes.
    hamming = f"{code_sql('e.code', bits)} <~> {code_sql('n.code', bits)}"
    sql = f"""
        SELECT n.image_id, np.merchant_id, c.image_id, p.merchant_id, c.hamming, c.distance
        FROM catalog_imageembedding n
        JOIN catalog_product np ON np.id = n.product_id
        CROSS JOIN LATERAL (
            SELECT e.image_id, e.product_id, ({hamming})::int AS hamming, (e.fc7 <-> n.fc7) AS distance
            FROM catalog_imageembedding e
            WHERE {version_sql("e", model_version.pk)} AND e.product_id <> n.product_id
            ORDER BY {hamming}
            LIMIT %s
        ) c
        JOIN catalog_product p ON p.id = c.product_id  -- outside the LATERAL: joins findings, not all candidates
        WHERE {version_sql("n", model_version.pk)} AND n.image_id = ANY(%s)
          AND c.hamming <= %s AND c.distance <= %s
    """
    with transaction.atomic(), connection.cursor() as cursor:
        # HNSW returns at most ef_search rows: a LIMIT beyond it would silently shorten the candidate list.
        cursor.execute(f"SET LOCAL hnsw.ef_search = {2 * DUPLICATE_CANDIDATES}")
        cursor.execute(sql, [DUPLICATE_CANDIDATES, list(image_ids), max_hamming, DUPLICATE_MAX_FC7_DISTANCE])
        pairs = cursor.fetchall()
    findings: dict[tuple[int, int], DuplicateFinding] = {}
    for image_id, merchant_id, other_id, other_merchant_id, hamming, distance in pairs:
        kind = (
            DuplicateFinding.Kind.DUPLICATE_LISTING
            if merchant_id == other_merchant_id
            else DuplicateFinding.Kind.POSSIBLE_COPY
        )
        for own, own_merchant, other in ((image_id, merchant_id, other_id), (other_id, other_merchant_id, image_id)):
            findings[(own, other)] = DuplicateFinding(
                merchant_id=own_merchant,
                image_id=own,
                other_image_id=other,
                model_version=model_version,
                kind=kind,
                hamming=hamming,
                fc7_distance=float(distance),
            )
    existing = DuplicateFinding.objects.filter(model_version=model_version).count()
    DuplicateFinding.objects.bulk_create(findings.values(), ignore_conflicts=True)
    return DuplicateFinding.objects.filter(model_version=model_version).count() - existing


def image_fetch(*, url: str) -> bytes:
    """Download an image URL under the fetch policy; private ranges only where IMAGE_FETCH_ALLOWED_NETWORKS says."""
    return intake.url_fetch(url, allowed_networks=tuple(getattr(settings, "IMAGE_FETCH_ALLOWED_NETWORKS", ())))


def product_image_add(
    *, product: Product, data: bytes | None = None, url: str = "", position: int = 0
) -> ImageAddResult:
    """One image for one product, uploaded (`data`) or by URL; validated, deduplicated, embedded after commit."""
    if data is None:
        if not url:
            raise intake.IntakeError("give an image file or an image URL")
        data = image_fetch(url=url)
    return image_add(product=product, data=data, position=position, source_url=url)


MEDIA_ORPHAN_MIN_AGE_S = 3600  # younger files may belong to a chunk still in its transaction


def media_orphans_delete(*, min_age_s: float = MEDIA_ORPHAN_MIN_AGE_S) -> int:
    """Delete stored image and upload files no row points at (left by a worker killed mid-chunk: its rows rolled
    back, its files did not). Only files older than `min_age_s`, so nothing an open transaction may yet commit."""
    storage = ProductImage._meta.get_field("file").storage
    referenced = set(ProductImage.objects.values_list("file", flat=True))
    referenced |= set(ImportJob.objects.exclude(archive="").values_list("archive", flat=True))
    cutoff = timezone.now() - timezone.timedelta(seconds=min_age_s)
    deleted = 0
    for top in ("products", "imports"):
        for name in _storage_walk(storage, top):
            if name not in referenced and storage.get_modified_time(name) < cutoff:
                storage.delete(name)
                deleted += 1
    return deleted


def _storage_walk(storage: Any, directory: str) -> list[str]:
    if not storage.exists(directory):
        return []
    folders, files = storage.listdir(directory)
    names = [f"{directory}/{name}" for name in files]
    for folder in folders:
        names.extend(_storage_walk(storage, f"{directory}/{folder}"))
    return names


INDEX_CHANGE_RETENTION = timedelta(days=1)  # in-memory indexes poll on every search; one asleep longer reloads


def index_changes_prune(*, older_than: timedelta = INDEX_CHANGE_RETENTION) -> int:
    """Delete change-log rows older than `older_than` (the log only notifies; the catalog rows are the truth).
    An in-memory index that had not read them yet notices the hole and reloads (catalog.hamming)."""
    deleted, _ = IndexChange.objects.filter(created_at__lt=timezone.now() - older_than).delete()
    return deleted


# --- retraining -------------------------------------------------------------------------------------------------
TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 5,
    "instances_per_batch": 32,  # P products per batch, K views each: batch-hard triplets need several products
    "views_per_instance": 2,
    "augment": "strong",  # the catalog photos are clean; shoppers' are not
    "num_threads": 2,
    "model": {"input_size": 64, "code_bits": 64},  # small inputs keep a CPU run to minutes per epoch
}
TRAINING_PROGRESS_SAVE_S = 2.0  # progress is written at most this often: the dashboard polls, SGD must not wait


def training_run_start(*, run: TrainingRun) -> TrainingRun:
    """Save a prepared run (its `config` overlays TRAINING_DEFAULTS) and train it on the `train` queue."""
    run.state = TrainingRun.State.PENDING
    run.save()
    dispatch.train_network(training_run_id=run.pk)
    return run


def catalog_export_write(*, directory: Path) -> Path:
    """The active catalog in the catalog-export format that workers.ml.datasets.catalog_export reads: one line per
    product (several images each: the instances metric learning needs) with its category and attributes."""
    images_dir = directory / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    products = Product.objects.filter(active=True).prefetch_related("images").order_by("pk")
    with open(directory / "manifest.jsonl", "w", encoding="utf-8") as manifest:
        for product in products.iterator(chunk_size=500):
            paths = []
            for image in product.images.all():
                if image.status == ProductImage.Status.FAILED:
                    continue
                target = images_dir / f"{image.pk}{Path(image.file.name).suffix}"
                with image.file.open("rb") as source:
                    target.write_bytes(source.read())
                paths.append(f"images/{target.name}")
            if paths:
                line = {
                    "sku": f"{product.merchant_id}/{product.sku}",
                    "category": product.category or None,
                    "attributes": list(product.attributes),
                    "images": paths,
                    "title": product.title,
                }
                manifest.write(json.dumps(line) + "\n")
    return directory


def training_run_execute(
    *,
    run: TrainingRun,
    train: Callable[..., Path],
    load_records: Callable[[Path], tuple[Sequence[Any], Any]],
    encoder_for: EncoderFor,
) -> ModelVersion:
    """Export the catalog, train on it (progress and per-epoch metrics land on the run for the dashboard) and
    register the result as a ready ModelVersion; switching search to it is the admin's decision."""
    run.state = TrainingRun.State.RUNNING
    run.progress = 0.0
    run.epoch_metrics = []
    run.save(update_fields=["state", "progress", "epoch_metrics"])
    work_dir = Path(settings.MODELS_DIR) / "runs" / f"run-{run.pk}"
    config = {**TRAINING_DEFAULTS, **run.config, "out_dir": str(work_dir)}
    config["model"] = {**TRAINING_DEFAULTS["model"], **run.config.get("model", {})}
    last_save = 0.0

    def progress(event: dict[str, Any]) -> None:
        nonlocal last_save
        epochs = max(1, int(event.get("epochs") or config["epochs"]))
        if event.get("done"):
            run.epoch_metrics = [*run.epoch_metrics, {"epoch": event["epoch"], **event.get("metrics", {})}]
            run.progress = (int(event["epoch"]) + 1) / epochs
        else:
            steps = max(1, int(event.get("steps") or 1))
            run.progress = (int(event.get("epoch", 0)) + int(event.get("step", 0)) / steps) / epochs
        if event.get("done") or time.monotonic() - last_save >= TRAINING_PROGRESS_SAVE_S:
            run.save(update_fields=["progress", "epoch_metrics"])
            last_save = time.monotonic()

    try:
        records, label_space = load_records(catalog_export_write(directory=work_dir / "catalog"))
        if not len(records):
            raise ValueError("the catalog has no active product with an image to train on")
        path = train(config, records=records, label_space=label_space, progress=progress)
        encoder = encoder_for(path)
        version = ModelVersion.objects.create(
            name=f"fashionnet-run{run.pk}",
            kind=ModelVersion.Kind.FASHIONNET,
            status=ModelVersion.Status.READY,
            checkpoint=str(path),
            code_bits=encoder.code_bits,
            fc7_dim=encoder.fc7_dim,
            config={**encoder.version_info, "training": config},
            metrics=run.epoch_metrics[-1] if run.epoch_metrics else {},
        )
    except Exception:
        run.state = TrainingRun.State.FAILED
        run.log = traceback.format_exc()[-20_000:]
        run.finished_at = timezone.now()
        run.save(update_fields=["state", "log", "finished_at"])
        raise
    run.state = TrainingRun.State.DONE
    run.progress = 1.0
    run.model_version = version
    run.finished_at = timezone.now()
    run.save(update_fields=["state", "progress", "model_version", "finished_at", "epoch_metrics"])
    return version
