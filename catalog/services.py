"""Writes. Keyword-only, typed; the one place where catalog rows change (views and tasks call these)."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.files.base import ContentFile
from django.db import connection, transaction
from django.utils import timezone
from pgvector import Bit
from PIL import Image

from catalog import intake, selectors
from catalog.models import ImageEmbedding, Merchant, ModelVersion, Product, ProductImage

logger = logging.getLogger(__name__)

EMBED_CHUNK = 64  # images per embed task: big enough to batch the network, small enough to retry cheaply
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
    values = {
        "title": title,
        "description": description,
        "category": category,
        "attributes": sorted(set(attributes)),
        "price": None if price is None else Decimal(price).quantize(Decimal("0.01")),
        "url": url,
        "active": active,
    }
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


@dataclass(frozen=True)
class ImageAddResult:
    image: ProductImage
    created: bool  # False: this product already had this exact file (same sha256): nothing stored or re-embedded


def image_add(*, product: Product, data: bytes, position: int = 0, source_url: str = "") -> ImageAddResult:
    """Validate an untrusted image, store its re-encoded copy and queue its embedding (after commit).

    Idempotent on the sha256 of the uploaded bytes: the same file for the same product is neither stored again
    nor re-embedded. Raises intake.IntakeError for unusable input (nothing is stored then).
    """
    validated = intake.image_validate(data)
    existing = ProductImage.objects.filter(product=product, sha256=validated.sha256).first()
    if existing is not None:
        if existing.position != position:
            existing.position = position
            existing.save(update_fields=["position"])
        return ImageAddResult(existing, False)
    image = ProductImage(
        product=product,
        sha256=validated.sha256,
        size_bytes=len(validated.data),
        position=position,
        source_url=source_url,
    )
    image.file.save(f"{validated.sha256[:32]}.{validated.extension}", ContentFile(validated.data), save=False)
    image.save()
    images_embed_enqueue(image_ids=[image.pk])
    return ImageAddResult(image, True)


def code_index_name(version: ModelVersion) -> str:
    return f"catalog_embedding_code_hnsw_v{version.pk}"


def code_index_ensure(*, version: ModelVersion) -> str:
    """Create the version's HNSW index on its codes (bit_hamming_ops) unless it exists.

    Codes are stored unsized because versions differ in code length; pgvector indexes such a column through an
    expression (`code::bit(B)`) on a partial index (`WHERE model_version_id = v`), one per version. Queries must
    use the same expression to use it (catalog.hamming does).
    """
    name = code_index_name(version)
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE INDEX IF NOT EXISTS {name} ON catalog_imageembedding "
            f"USING hnsw ((code::bit({int(version.code_bits)})) bit_hamming_ops) "
            f"WHERE model_version_id = {int(version.pk)}"
        )
    return name


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


def embedding_save(
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
    """Insert or replace the embedding of `image` under `model_version` (idempotent: re-embedding is an update)."""
    bits = np.asarray(bits, dtype=bool).reshape(-1)
    fc7 = np.asarray(fc7, dtype=np.float32).reshape(-1)
    if bits.size != model_version.code_bits or fc7.size != model_version.fc7_dim:
        raise ValueError(
            f"version {model_version.pk} expects {model_version.code_bits} bits and {model_version.fc7_dim}-d fc7,"
            f" got {bits.size} bits and {fc7.size}-d"
        )
    embedding, _ = ImageEmbedding.objects.update_or_create(
        image=image,
        model_version=model_version,
        defaults={
            "product_id": image.product_id,
            "code": Bit(bits).to_text(),
            "fc7": fc7,
            "category": category,
            "category_confidence": category_confidence,
            "attributes": attributes or {},
            "landmarks": [list(map(float, point)) for point in (landmarks or [])],
        },
    )
    return embedding


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
    for version in versions:
        encoder = encoder_for(checkpoint_path(version))
        encoding = encoder.encode([pil for _, pil in loaded])
        with transaction.atomic():
            for index, (image, _) in enumerate(loaded):
                embedding_save(
                    image=image,
                    model_version=version,
                    bits=encoding.bits[index],
                    fc7=encoding.fc7[index],
                    **_predictions(encoding, index, encoder.label_space),
                )
    ProductImage.objects.filter(pk__in=[image.pk for image, _ in loaded]).update(
        status=ProductImage.Status.EMBEDDED, error=""
    )
    return {"embedded": len(loaded), "failed": failed, "versions": [v.pk for v in versions]}


def images_embed_enqueue(*, image_ids: Sequence[int]) -> None:
    """Queue embedding of these images once the current transaction commits (in chunks on the `embed` queue)."""
    from workers import tasks  # late: tasks imports this module

    ids = list(image_ids)
    for start in range(0, len(ids), EMBED_CHUNK):
        chunk = ids[start : start + EMBED_CHUNK]
        transaction.on_commit(lambda chunk=chunk: tasks.embed_images.delay(chunk))


def query_encode(*, data: bytes, version: ModelVersion, encoder_for: EncoderFor) -> dict[str, Any]:
    """Encode one validated query photo; plain JSON for the trip back through the result backend."""
    encoder = encoder_for(checkpoint_path(version))
    encoding = encoder.encode([Image.open(io.BytesIO(data)).convert("RGB")])
    labels = encoder.label_space
    result = {
        "model_version_id": version.pk,
        "bits": Bit(encoding.bits[0]).to_text(),
        "fc7": [float(x) for x in encoding.fc7[0]],
        **_predictions(encoding, 0, labels),
        "category_probs": {},
    }
    if encoding.category_probs is not None and labels.categories:
        order = np.argsort(-encoding.category_probs[0])[:CATEGORY_TOP]
        result["category_probs"] = {labels.categories[i]: float(encoding.category_probs[0][i]) for i in order}
    return result


def model_version_bootstrap(*, name: str = "v0-baseline", code_bits: int = 64, fc7_dim: int = 256) -> ModelVersion:
    """Make sure a shop can search before anyone trains: if no version is active or on its way, fit version 0
    (pretrained backbone + PCA + ITQ) on the catalog in the background. Returns the version that will serve."""
    serving = ModelVersion.objects.filter(
        status__in=[ModelVersion.Status.ACTIVE, ModelVersion.Status.INDEXING, ModelVersion.Status.TRAINING]
    ).first()
    if serving:
        return serving
    from workers import tasks

    version = ModelVersion.objects.create(
        name=name if not ModelVersion.objects.filter(name=name).exists() else f"{name}-{timezone.now():%Y%m%d%H%M%S}",
        kind=ModelVersion.Kind.BASELINE,
        status=ModelVersion.Status.TRAINING,
        code_bits=code_bits,
        fc7_dim=fc7_dim,
    )
    transaction.on_commit(lambda: tasks.train_baseline.delay(version.pk))
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


def model_version_start_indexing(*, version: ModelVersion) -> ModelVersion:
    """Embed the whole catalog with `version` in the background; it becomes active when that is complete."""
    from workers import tasks

    code_index_ensure(version=version)
    with transaction.atomic():
        version.status = ModelVersion.Status.INDEXING
        version.save(update_fields=["status"])
        images_embed_enqueue(
            image_ids=list(selectors.images_missing_embedding(version=version).values_list("id", flat=True))
        )
        transaction.on_commit(lambda: tasks.embed_finish_indexing.delay(version.pk))
    return version


def model_version_finish_indexing(*, version: ModelVersion) -> bool:
    """Activate `version` if every image has its embedding (the atomic switch); False if not yet."""
    if selectors.images_missing_embedding(version=version).exists():
        return False
    model_version_activate(version=version)
    return True
