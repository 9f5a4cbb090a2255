"""What the workers do between the catalog and the network: embed images, encode a shopper's query photo, fit
version 0, train a new version on the catalog. Rows are read through catalog.selectors and written through
catalog.services; the network is workers.encoders (a process-wide Encoder per checkpoint) and workers.ml.

Only worker processes import this module (through workers.tasks). The network's modules (torch) are imported on
first use inside the functions below, so a worker process starts without them and loads them once, for its first
task or its warm-up.
"""

from __future__ import annotations

import io
import logging
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from django.conf import settings
from PIL import Image

from catalog import geometry, query_payload, selectors
from catalog.models import ModelVersion, ProductImage, TrainingRun
from catalog.services import embeddings, model_versions, training
from inference.localise import encode_with_item

if TYPE_CHECKING:
    from catalog.query_payload import QueryEncoding
    from catalog.search import SearchOptions
    from workers.ml.encoder import Encoder, Encoding
    from workers.ml.training import TrainConfig

logger = logging.getLogger(__name__)

BASELINE_FIT_SAMPLE = 3000  # PCA/ITQ are stable well before this; more only costs fitting time
# The fit sample is held in memory whole: each picture at the network's input (224 px, 256 at least), not the 1024 px
# working copy: 3,000 pictures then take at most 0.6 GB, where full-size 12-MP photos would take 100 GB.
BASELINE_FIT_MIN_SIDE = 256
TRAINING_PROGRESS_SAVE_S = 2.0  # progress is written at most this often: the dashboard polls, SGD must not wait


def encoder_at(checkpoint: Path) -> Encoder:
    """The process's Encoder of a checkpoint, loaded on first use (this is where a worker first imports torch)."""
    from workers.encoders import encoder_for

    return encoder_for(checkpoint)


def encoder_of(version: ModelVersion) -> Encoder:
    return encoder_at(selectors.checkpoint_path(version=version))


def encoder_warm_up() -> str | None:
    """Load the active version's network now, so the first shopper query is not the one that pays ~3 s for it."""
    version = selectors.model_version_active()
    if version is None or not version.checkpoint:
        return None
    try:
        encoder_of(version)
    except Exception:  # a worker that cannot preload still serves: the task loads (and reports) it lazily
        logger.exception("could not preload the encoder of %s", version)
        return None
    return version.name


# --- embedding and query encoding -----------------------------------------------------------------------------------
def images_embed(*, image_ids: Sequence[int], delivery: embeddings.EmbedDelivery | None = None) -> dict[str, Any]:
    """Embed images under every serving version; images that cannot be decoded are marked failed, not retried.

    Each image's attempt is counted (committed) before its file is opened, so a delivery whose process dies on an
    image leaves the count, and the image ends FAILED after EMBED_MAX_ATTEMPTS deliveries that died
    (catalog.services.embeddings). After such a death the batch is embedded one image at a time, the suspect last,
    so the others are saved before it can kill the process again. `delivery` is the Celery task's (see
    EmbedDelivery); without one, every call counts.

    The images' local features (SIFT, for the verify stage) are extracted on a helper thread while this one waits
    for PostgreSQL to store the first version's embeddings (the HNSW insert and the duplicate search: 2-5 ms an
    image, all of it on the database's core), not while the network runs: the worker keeps one core busy, not two.
    They are saved in the same transaction as those embeddings."""
    versions = list(selectors.model_versions_serving())
    if not versions:  # nothing to embed with yet: only find the files that no longer decode
        images = selectors.images_by_id(image_ids=image_ids).exclude(status=ProductImage.Status.FAILED)
        return {"embedded": 0, "failed": _images_load(list(images))[1], "versions": []}
    work = embeddings.embed_work_claim(image_ids=image_ids, versions=versions, delivery=delivery)
    if not work.one_at_a_time:
        embeddings.embed_attempts_count(image_ids=[image.pk for image in work.images], delivery=delivery)
    totals = {"embedded": 0, "failed": work.given_up, "duplicates": 0}
    for batch in [[image] for image in work.images] if work.one_at_a_time else [work.images]:
        if work.one_at_a_time:
            embeddings.embed_attempts_count(image_ids=[batch[0].pk], delivery=delivery)
        for key, value in _batch_embed(batch, versions).items():
            totals[key] += value
    return {**totals, "versions": [v.pk for v in versions], "one_at_a_time": work.one_at_a_time}


def _images_load(images: Sequence[ProductImage]) -> tuple[list[tuple[ProductImage, Image.Image]], int]:
    """The images' working copies, and how many could not be read (marked failed)."""
    loaded: list[tuple[ProductImage, Image.Image]] = []
    failed = 0
    for image in images:
        try:
            loaded.append((image, selectors.image_open(image=image)))
        except Exception as exc:  # a broken stored file must not block the rest of the batch
            failed += 1
            embeddings.image_mark_failed(image_id=image.pk, error=str(exc))
    return loaded, failed


def _batch_embed(images: Sequence[ProductImage], versions: Sequence[ModelVersion]) -> dict[str, int]:
    """Embed these images (counted already) under `versions`, keypoints once per image; returns the counts."""
    loaded, failed = _images_load(images)
    if not loaded:
        return {"embedded": 0, "failed": failed, "duplicates": 0}
    duplicates = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="keypoints") as pool:
        keypoints = _KeypointsAlongside(pool, loaded)
        for version in versions:
            encoded_ids, found = _embed_with(version, loaded, keypoints=keypoints)
            duplicates += found
            failed += len(loaded) - len(encoded_ids)
            loaded = [(image, picture) for image, picture in loaded if image.pk in encoded_ids]
    embeddings.images_mark_embedded(image_ids=[image.pk for image, _ in loaded])
    return {"embedded": len(loaded), "failed": failed, "duplicates": duplicates}


class _KeypointsAlongside:
    """The local features of a batch's images that have none yet: extracted on the pool's thread once started,
    handed (once) to whichever embedding transaction comes first."""

    def __init__(self, pool: ThreadPoolExecutor, loaded: Sequence[tuple[ProductImage, Image.Image]]) -> None:
        missing = selectors.images_without_keypoints(image_ids=[image.pk for image, _ in loaded])
        self._todo = [(image, picture) for image, picture in loaded if image.pk in missing]
        self._pool = pool
        self._future: Future[dict[int, tuple[bytes, int]]] | None = None
        self._taken = False

    def start(self) -> None:
        if self._future is None:
            self._future = self._pool.submit(keypoints_extract, self._todo)

    def take(self) -> dict[int, tuple[bytes, int]]:
        """The extracted features (waiting for them), the first time; nothing after."""
        if self._taken:
            return {}
        self.start()
        assert self._future is not None
        packed = self._future.result()
        self._taken = True
        return packed


def _embed_with(
    version: ModelVersion,
    loaded: Sequence[tuple[ProductImage, Image.Image]],
    *,
    keypoints: _KeypointsAlongside | None = None,
) -> tuple[set[int], int]:
    """Encode loaded images with `version` and store their embeddings (codes, fc7, predictions): the ids of the images
    embedded, and how many duplicates that revealed. With `keypoints`, their extraction starts once the network is
    done and they are saved in the embeddings' transaction."""
    encoder = encoder_of(version)
    encoded = _encode_each_failing_alone(encoder, loaded)
    if keypoints is not None:
        keypoints.start()
    rows = [
        embeddings.embedding_row(
            image=image,
            model_version=version,
            bits=encoding.bits[index],
            fc7=encoding.fc7[index],
            **query_payload.predictions(encoding, index, encoder.label_space),
        )
        for image, encoding, index in encoded
    ]
    duplicates = embeddings.embeddings_record(
        model_version=version, rows=rows, keypoints=keypoints.take if keypoints is not None else None
    )
    return {image.pk for image, _, _ in encoded}, duplicates


def _encode_each_failing_alone(
    encoder: Encoder, loaded: Sequence[tuple[ProductImage, Image.Image]]
) -> list[tuple[ProductImage, Encoding, int]]:
    """(image, encoding, row) for each image the network encodes. The batch is encoded whole; if that fails, image
    by image, and an image that fails alone is marked failed (not retried) while the rest of its batch is embedded:
    one bad file never sends a whole batch back to the sweeper."""
    from celery.exceptions import SoftTimeLimitExceeded

    try:
        encoding = encoder.encode([picture for _, picture in loaded])
        return [(image, encoding, index) for index, (image, _) in enumerate(loaded)]
    except SoftTimeLimitExceeded:
        raise
    except Exception:
        logger.exception("encoding a batch of %d images failed; encoding them one at a time", len(loaded))
    encoded = []
    for image, picture in loaded:
        try:
            encoded.append((image, encoder.encode([picture]), 0))
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            logger.warning("image %s could not be encoded: %s", image.pk, exc)
            embeddings.image_mark_failed(image_id=image.pk, error=f"could not be encoded: {exc}")
    return encoded


def keypoints_store(loaded: Sequence[tuple[ProductImage, Image.Image]]) -> int:
    """Extract and store the local features (catalog.geometry) of those images that have none yet; they depend on
    the image alone, so a re-embedding under a new version reuses them. Returns how many were stored."""
    missing = selectors.images_without_keypoints(image_ids=[image.pk for image, _ in loaded])
    packed = keypoints_extract([(image, picture) for image, picture in loaded if image.pk in missing])
    embeddings.keypoints_save(packed=packed)
    return len(packed)


def keypoints_extract(loaded: Sequence[tuple[ProductImage, Image.Image]]) -> dict[int, tuple[bytes, int]]:
    """The packed local features of each image (image id -> (bytes, count)); no database access, so it can run on
    another thread. An image they cannot be extracted from is left out (verification is an extra)."""
    packed: dict[int, tuple[bytes, int]] = {}
    for image, picture in loaded:
        try:
            features = geometry.extract(picture, side=geometry.CATALOG_SIDE)
        except Exception:  # an image it cannot read is still embedded (and unverified)
            logger.exception("could not extract local features of image %s", image.pk)
            continue
        packed[image.pk] = (geometry.pack(features), len(features))
    return packed


def query_encode(
    *, photo_message: str, version_id: int, keypoints: bool = False, flip: bool = False, item_weight: float = 0.0
) -> dict[str, Any]:
    """Encode one validated query photo (as catalog.query_payload sent it); plain JSON for the trip back, with the
    photo's item boxes. With `keypoints`, also the photo's packed local features (catalog.geometry) for the search's
    verify stage; with `flip`, fc7 averaged with the mirror image's (Encoder.encode; measured by bench_retrieval
    --variants); with `item_weight` > 0, mixed with the photo cropped to its best item box
    (inference.localise.encode_with_item, as the web's in-process encoder does)."""
    version = selectors.model_version_get(version_id=version_id)
    photo = Image.open(io.BytesIO(query_payload.photo_from_message(photo_message))).convert("RGB")
    encoder = encoder_of(version)
    if flip:
        encoding = encoder.encode([photo], flip=True, boxes=True)
        boxes = list(encoding.item_boxes[0]) if encoding.item_boxes else []
        fused = False
    else:
        encoding, boxes, fused = encode_with_item(encoder, photo, weight=item_weight)
    query = query_payload.query_encoding(
        encoding,
        label_space=encoder.label_space,
        model_version_id=version.pk,
        keypoints=geometry.pack(geometry.extract(photo, side=geometry.QUERY_SIDE)) if keypoints else None,
        item_boxes=boxes,
        item_fused=fused,
    )
    return query_payload.encoding_to_message(query)


# --- version 0 ------------------------------------------------------------------------------------------------------
def model_version_fit_baseline(*, version_id: int) -> ModelVersion:
    """Fit version 0 (pretrained backbone + PCA + ITQ) on a sample of the catalog's images. The shop's first
    version then indexes the catalog and becomes active; a refit (another version serves) ends ready and is
    evaluated on the golden set, for an admin to switch to (model_versions.model_version_refit_baseline)."""
    from workers.ml.baseline import baseline_input_size, fit_baseline

    version = selectors.model_version_get(version_id=version_id)
    recipe = (version.config or {}).get("baseline", {})  # a recipe under comparison (bench_retrieval --baseline)
    side = max(
        BASELINE_FIT_MIN_SIDE,
        baseline_input_size(**{k: v for k, v in recipe.items() if k in ("backbone", "input_size")}),
    )
    pictures, categories = [], []
    catalog_images = selectors.images_usable_count()
    for image in selectors.images_usable(limit=BASELINE_FIT_SAMPLE, seed=version.pk):
        try:
            pictures.append(selectors.image_open(image=image, max_side=side))
            categories.append(image.product.category or None)
        except Exception:
            logger.warning("skipping unreadable image %s in baseline fit", image.pk)
    out_path = Path(settings.MODELS_DIR) / f"{version.name}-{version.pk}.pt"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path = fit_baseline(
            pictures,
            out_path=out_path,
            categories=categories,
            code_bits=version.code_bits,
            fc7_dim=version.fc7_dim,
            **recipe,
        )
    except Exception as exc:
        model_versions.model_version_fail(version=version, error=str(exc))
        raise
    encoder = encoder_at(path)  # the fitted checkpoint's real sizes (fc7 may be clamped to the sample)
    refit_of = (version.config or {}).get("refit_of")
    model_versions.model_version_ready(
        version=version, checkpoint=path, code_bits=encoder.code_bits, fc7_dim=encoder.fc7_dim,
        config={**encoder.version_info, **({"baseline": recipe} if recipe else {}),
                **({"refit_of": refit_of} if refit_of else {})},
    )  # fmt: skip
    model_versions.baseline_fit_record(version=version, catalog_images=catalog_images, sample=len(pictures))
    active = selectors.model_version_active()
    if active is not None and active.pk != version.pk:
        version_evaluate_for_switch(version=version)  # an admin switches to it, like a trained version
        version.refresh_from_db()
        return version
    return model_versions.model_version_start_indexing(version=version)


# --- retraining -----------------------------------------------------------------------------------------------------
CATALOG_EXPORT_DATASET = "catalog-export"  # what a run's resolved config names as its data
# Of the products a retrain trains on, this share are rendered ones (workers.ml.datasets.mixed), which carry the
# landmark labels a shop's catalog lacks and so train the landmark branch (its PCK on held-out renders lands with the
# version's numbers). They stay out of the shop's metric space and come on top of P's shop products in a batch
# (training.batch_products); the landmark part enters fc7 at version 0's scale (warm_start). Measured in
# docs/benchmarks.md ("The shop retrain's default recipe"); a run's config may train on the catalog alone
# ({"dataset": {"mix_rendered": 0}}).
RETRAIN_RENDERED_SHARE = 0.25


def catalog_export_write(*, directory: Path) -> Path:
    """The active catalog in the catalog-export format (workers.ml.datasets.catalog_export): one line per product,
    with every usable image (the several instances metric learning needs), its category and attributes."""
    from workers.ml.datasets.catalog_export import CatalogExportWriter

    with CatalogExportWriter(directory) as writer:
        for product in selectors.products_to_train_on():
            writer.add(
                sku=product_key(product.merchant_id, product.sku),
                category=product.category,
                attributes=product.attributes,
                title=product.title,
                images=(
                    (f"{image.pk}{Path(image.file.name).suffix}", selectors.image_read(image=image))
                    for image in product.usable_images
                ),
            )
    return directory


def product_key(merchant_id: int, sku: str) -> str:
    """How a shop's product is named in its training export (unique across merchants) and by golden_split."""
    return f"{merchant_id}/{sku}"


def training_run_execute(*, run_id: int) -> ModelVersion | None:
    """Export the catalog, train on it (progress and per-epoch metrics land on the run for the dashboard) and
    register the result as a ready ModelVersion; switching search to it is the admin's decision.

    The run holds only what the admin chose; TrainConfig's defaults fill in the rest, and the resolved config is
    written back onto the run. A run the admin cancels stops between two steps, ends CANCELLED and registers
    nothing (None)."""
    from workers.ml.datasets.catalog_export import CatalogExport
    from workers.ml.datasets.factory import build_dataset
    from workers.ml.training import TrainConfig, TrainingCancelled, train

    run = selectors.training_run_get(run_id=run_id)
    work_dir = Path(settings.MODELS_DIR) / "runs" / f"run-{run.pk}"
    export_dir = work_dir / "catalog"
    try:
        config = TrainConfig.from_overrides(
            run.config, {"out_dir": str(work_dir), "dataset": retrain_dataset(run.config, export_dir)}
        )
        if not training.training_run_begin(run=run, config=config.to_dict()):
            return None  # cancelled while it waited in the queue
        export = CatalogExport(catalog_export_write(directory=export_dir))
        if not len(export):
            raise ValueError("the catalog has no active product with an image to train on")
        data = build_dataset(config.dataset)  # the catalog, with the rendered products mixed in
        path = train(
            config,
            records=data.records,
            label_space=data.label_space,
            validate=golden_epoch_validator(export, data.label_space),
            progress=_progress_saver(run, config),
        )
        encoder = encoder_at(path)
        version = training.training_run_finish(
            run=run,
            checkpoint=path,
            code_bits=encoder.code_bits,
            fc7_dim=encoder.fc7_dim,
            # which epoch was registered (-1: the start), chosen on the golden set's validation part
            config={
                **encoder.version_info,
                "training": config.to_dict(),
                "selected_epoch": encoder.metrics.get("selected_epoch"),
            },
        )
    except TrainingCancelled:
        training.training_run_cancelled(run=run)
        return None
    except Exception:
        training.training_run_fail(run=run, log=traceback.format_exc())
        raise
    if version is None:  # cancelled after the last step: finish registered nothing
        return None
    version_evaluate_for_switch(version=version)
    return version


def retrain_dataset(run_config: dict[str, Any], export_dir: Path) -> dict[str, Any]:
    """The data spec of a retrain (workers.ml.datasets.factory): the exported catalog, with RETRAIN_RENDERED_SHARE
    rendered products mixed in unless the run chose another `mix_rendered`."""
    share = (run_config.get("dataset") or {}).get("mix_rendered", RETRAIN_RENDERED_SHARE)
    return {"name": CATALOG_EXPORT_DATASET, "directory": str(export_dir), "mix_rendered": float(share)}


def version_evaluate_for_switch(*, version: ModelVersion) -> None:
    """The new version's golden-set numbers (a retrain's, or a refit version 0's), for the admin's switch decision.
    The version is ready either way: an evaluation that fails says why on the version instead of failing the run."""
    from catalog.services import golden

    active = selectors.model_version_active()
    # the switch compares the new version with the active one: that needs the active one's numbers too
    unevaluated_active = [active] if active is not None and golden.version_golden(active) is None else []
    for evaluated in [version, *unevaluated_active]:
        try:
            version_evaluate_golden(version_id=evaluated.pk)
        except Exception as exc:
            logger.exception("golden-set evaluation of %s failed", evaluated)
            error = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            golden.version_golden_record(version_id=evaluated.pk, numbers=error)


def _progress_saver(run: TrainingRun, config: TrainConfig) -> Callable[[dict[str, Any]], None]:
    """train()'s progress callback: the run's fraction done and per-epoch metrics, saved at most every
    TRAINING_PROGRESS_SAVE_S (and at the end of every epoch); as often, it reads the run's cancel flag and stops
    training (TrainingCancelled) once the admin has set it."""
    from workers.ml.training import TrainingCancelled

    last_save = 0.0

    def progress(event: dict[str, Any]) -> None:
        nonlocal last_save
        epochs = max(1, int(event.get("epochs") or config.epochs))
        epoch_metrics = run.epoch_metrics
        if event.get("done"):
            metrics = dict(event.get("metrics", {}))
            validation = metrics.pop("validation", None) or {}
            # the per-epoch golden check, flat so that the run page's table shows it beside the losses
            golden_now = {f"golden_r1_{mode}": validation[mode] for mode in ("cascade", "fc7") if mode in validation}
            epoch_metrics = [*epoch_metrics, {"epoch": event["epoch"], **metrics, **golden_now}]
            fraction = (int(event["epoch"]) + 1) / epochs
        else:
            steps = max(1, int(event.get("steps") or 1))
            fraction = (int(event.get("epoch", 0)) + int(event.get("step", 0)) / steps) / epochs
        if event.get("done") or time.monotonic() - last_save >= TRAINING_PROGRESS_SAVE_S:
            training.training_run_progress(run=run, progress=fraction, epoch_metrics=epoch_metrics)
            last_save = time.monotonic()
            if selectors.training_run_cancel_requested(run_id=run.pk):
                raise TrainingCancelled(f"training run {run.pk} was cancelled")

    return progress


# --- golden-set evaluation ------------------------------------------------------------------------------------------
GOLDEN_EPOCH_GALLERY = 2000  # products searched by the per-epoch check: a few seconds an epoch on a demo shop
GOLDEN_SAMPLE_PRODUCTS = 200  # held-out queries per evaluation: R@1 to about +-3 points, a minute on a demo shop
GOLDEN_SEED = 11  # the same products and the same photos for every version, so that their numbers compare
# Mild: at the harsh strength both version 0 and young trained versions sit near the floor, where R@1 no longer
# says which of two versions is better (the switch decision rests on it).
GOLDEN_HELDOUT_STRENGTH = "heldout-mild"
GOLDEN_OCCLUDERS = 8  # other products' photos a held-out query may show lying across its product
GOLDEN_K = 10  # R@10 and the final top-k of per-stage recall
GOLDEN_EMBED_BATCH = 64  # images per encode while embedding the catalog for an evaluated version
UNCATEGORISED = "(no category)"  # how the per-category numbers name products listed without one


def version_embed_catalog(*, version: ModelVersion) -> int:
    """Embed every image `version` has not embedded yet (an evaluated version is searched like the active one;
    switching to it later reuses these rows). Returns how many were embedded."""
    model_versions.code_index_ensure(version=version)
    missing = list(selectors.images_missing_embedding(version=version).values_list("id", flat=True))
    done = 0
    for start in range(0, len(missing), GOLDEN_EMBED_BATCH):
        loaded = []
        for image in selectors.images_by_id(image_ids=missing[start : start + GOLDEN_EMBED_BATCH]):
            try:
                loaded.append((image, selectors.image_open(image=image)))
            except Exception:  # the embed workers mark it failed; the evaluation just leaves it out
                logger.warning("skipping unreadable image %s in a golden-set evaluation", image.pk)
        if loaded:
            keypoints_store(loaded)  # those the embed workers have not stored yet: the verify stage reads them
            done += len(_embed_with(version, loaded)[0])
    return done


def golden_query_photos(*, version: ModelVersion) -> list[tuple[str, int, str, bytes]]:
    """The golden set as (source, product id, merchant slug, photo file): held-out shopper views of a seeded sample
    of the catalog's own products (workers.ml.heldout_queries: code training never runs), then the real shopper
    photos staff added (GoldenQuery)."""
    from workers.ml.heldout_queries import heldout_query

    sample = selectors.golden_products_sample(version=version, count=GOLDEN_SAMPLE_PRODUCTS, seed=GOLDEN_SEED)
    pictures = {}
    for item in sample:
        try:
            pictures[item.product_id] = selectors.image_open(image=item.image)
        except Exception:
            logger.warning("skipping unreadable image %s in the golden set", item.image.pk)
    photos = []
    order = list(pictures)
    for item in sample:
        if item.product_id not in pictures:
            continue
        rng = np.random.default_rng([GOLDEN_SEED, item.product_id])
        others = [order[int(i)] for i in rng.choice(len(order), size=min(GOLDEN_OCCLUDERS, len(order)), replace=False)]
        photo = heldout_query(
            pictures[item.product_id],
            rng,
            occluders=[pictures[other] for other in others if other != item.product_id],
            strength=GOLDEN_HELDOUT_STRENGTH,
        )
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG")
        photos.append(("heldout", item.product_id, item.merchant_slug, buffer.getvalue()))
    for query in selectors.golden_queries_usable():
        with query.photo.open("rb") as handle:
            photos.append((str(query.source), query.product_id, query.product.merchant.slug, handle.read()))
    return photos


def version_evaluate_golden(*, version_id: int) -> dict[str, Any]:
    """Evaluate a version on the golden set through the real cascade (catalog.search.search_encoding over the
    version's own embeddings, the catalog embedded first where it is not), and store the numbers on the version
    (`metrics["golden"]`): R@1, R@10, mAP@10, per-stage recall (the product among the coarse candidates; in the
    final top-k) and the worker's encode latency, overall, per source, per golden split (validation: what a run
    chose its checkpoint on; test: only reported), per shop and per category of the product
    sought; and the "same product" calibration of the served (fused) scores."""
    from catalog.search import SearchOptions, search_encoding, verify_enabled
    from catalog.services import golden

    version = selectors.model_version_get(version_id=version_id)
    started = time.perf_counter()
    embedded = version_embed_catalog(version=version)
    outcomes: list[dict[str, Any]] = []
    scored: list[tuple[float, bool, int]] = []  # (a result's score, is it the query's product, query number)
    # The cascade as served (verify per the server's SEARCH_VERIFY, item fusion per SEARCH_ITEM_FUSION): the
    # calibration is fitted on these scores and applied to the scores shoppers are served, so the two must come from
    # the same stages.
    options = SearchOptions(k=GOLDEN_K)
    verify = verify_enabled(options)
    photos = golden_query_photos(version=version)
    category_of = selectors.product_categories(product_ids=[product_id for _, product_id, _, _ in photos])
    key_of = selectors.product_merchant_skus(product_ids=[product_id for _, product_id, _, _ in photos])
    for source, product_id, merchant, photo in photos:
        encode_started = time.perf_counter()
        encoding = _query_encoding(photo, version=version, options=options)
        encode_ms = (time.perf_counter() - encode_started) * 1000
        result = search_encoding(encoding=encoding, version=version, options=options)
        ranked = [hit.product.pk for hit in result.hits]
        scored += [(hit.score, hit.product.pk == product_id, len(outcomes)) for hit in result.hits]
        # the coarse stage's candidates (embedding ids) that SearchResult carries for per-stage recall
        candidate_ids = getattr(result, "candidate_ids", np.zeros(0, np.int64))
        coarse = set(selectors.embedding_products(embedding_ids=candidate_ids.tolist()).values())
        outcomes.append(
            {
                "source": source,
                "merchant": merchant,
                "category": category_of.get(product_id) or UNCATEGORISED,
                # staff's real photos never choose a checkpoint: they are test queries
                "split": golden_split(product_key(*key_of[product_id])) if source == "heldout" else "test",
                "rank": ranked.index(product_id) + 1 if product_id in ranked else None,
                "coarse": product_id in coarse,
                "encode_ms": encode_ms,
                "search_ms": float(result.timings_ms.get("total", 0.0)),
            }
        )
    calibration = match_calibration(scored)
    landmarks = version_landmarks(version=version)
    numbers = {
        **golden_numbers(outcomes),
        # the landmark branch on held-out rendered views (a shop's catalog has no landmarks to measure it on)
        **({"landmark_pck": landmarks["pck"]} if landmarks else {}),
        "landmarks": landmarks,
        # the calibration's reliability, shown with the version's numbers (absent: too few results to measure it)
        **({"calibration_ece": calibration["ece"]} if calibration.get("ece") is not None else {}),
        "by_source": _grouped(outcomes, "source"),
        "by_split": _grouped(outcomes, "split"),
        "by_shop": _grouped(outcomes, "merchant"),
        "by_category": _grouped(outcomes, "category"),
        "calibration": calibration,
        "recent_overlap": recent_overlap(version=version),
        "k": GOLDEN_K,
        "verify": verify,
        "heldout_strength": GOLDEN_HELDOUT_STRENGTH,
        "sample_seed": GOLDEN_SEED,
        "catalog_embedded_now": embedded,
        "seconds": round(time.perf_counter() - started, 2),
        "evaluated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    golden.version_golden_record(version_id=version.pk, numbers=numbers)
    return numbers


def version_landmarks(*, version: ModelVersion) -> dict[str, Any] | None:
    """PCK@0.1 of the item box's diagonal of the version's landmark branch on held-out rendered products
    (workers.ml.evaluation.landmark_report); None for a version without one (version 0, a catalog-only retrain)."""
    if version.kind != ModelVersion.Kind.FASHIONNET:
        return None
    from workers.ml.datasets import render
    from workers.ml.datasets.factory import landmark_heldout_views
    from workers.ml.evaluation import landmark_report

    encoder = encoder_of(version)
    if encoder.label_space.num_landmarks != render.LABEL_SPACE.num_landmarks:
        return None  # no landmark branch, or another layout than the renders' (before drawing them)
    return landmark_report(encoder, landmark_heldout_views())


def _query_encoding(photo: bytes, *, version: ModelVersion, options: SearchOptions) -> QueryEncoding:
    """A query photo encoded here exactly as the search worker encodes it for a shopper searching with `options`
    (local features if the verify stage runs, the best item box mixed in as item fusion says)."""
    from catalog.search import item_fusion_weight, verify_enabled

    message = query_encode(
        photo_message=query_payload.photo_to_message(photo), version_id=version.pk,
        keypoints=verify_enabled(options), item_weight=item_fusion_weight(options),
    )  # fmt: skip
    return query_payload.encoding_from_message(message)


def recent_overlap(*, version: ModelVersion) -> dict[str, Any] | None:
    """How much of the active version's top 10 `version` would also show, on the recent-query sample (shoppers'
    search photos, kept only where the shops allow it), each searched as the shopper did (scoped to the shop it
    was): the mean share of the top 10 both return, and how often both put the same product first. None when
    there is no other active version or no sample. `version` has embedded the catalog (version_embed_catalog)."""
    from catalog.hamming.candidates import ProductFilter
    from catalog.search import SearchOptions, search_encoding

    active = selectors.model_version_active()
    queries = list(selectors.recent_queries())
    if active is None or active.pk == version.pk or not queries:
        return None
    photos = []
    for query in queries:
        try:
            with query.photo.open("rb") as handle:
                photos.append((query.merchant_id, handle.read()))
        except OSError:  # expired under our feet
            continue
    tops: dict[int, list[list[int]]] = {}
    for searched in (version, active):  # one version after the other: the memory index holds one at a time
        results = []
        for merchant_id, photo in photos:
            options = SearchOptions(k=GOLDEN_K, product_filter=ProductFilter(merchant_id=merchant_id))
            encoding = _query_encoding(photo, version=searched, options=options)
            results.append(
                [hit.product.pk for hit in search_encoding(encoding=encoding, version=searched, options=options).hits]
            )
        tops[searched.pk] = results
    pairs = list(zip(tops[version.pk], tops[active.pk]))
    if not pairs:
        return None
    return {
        "against": active.name,
        "against_id": active.pk,
        "queries": len(pairs),
        "overlap10": round(
            float(np.mean([len(set(ours) & set(theirs)) / max(1, len(ours), len(theirs)) for ours, theirs in pairs])), 4
        ),
        "same_top1": round(float(np.mean([bool(ours) and ours[:1] == theirs[:1] for ours, theirs in pairs])), 4),
    }


def golden_numbers(outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """R@1, R@10, mAP@10 (one relevant product per query: the reciprocal rank within the top k), per-stage recall
    and encode latency of a list of query outcomes."""
    if not outcomes:
        return {"queries": 0}
    ranks = [o["rank"] for o in outcomes]
    encode = np.asarray([o["encode_ms"] for o in outcomes])
    return {
        "queries": len(outcomes),
        "r1": round(float(np.mean([r == 1 for r in ranks])), 4),
        "r10": round(float(np.mean([r is not None for r in ranks])), 4),
        "map10": round(float(np.mean([1.0 / r if r else 0.0 for r in ranks])), 4),
        "coarse_recall": round(float(np.mean([o["coarse"] for o in outcomes])), 4),
        "final_recall": round(float(np.mean([r is not None for r in ranks])), 4),
        "encode_ms_p50": round(float(np.percentile(encode, 50)), 2),
        "encode_ms_p95": round(float(np.percentile(encode, 95)), 2),
        "search_ms_p50": round(float(np.median([o["search_ms"] for o in outcomes])), 2),
    }


def _grouped(outcomes: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    return {
        value: golden_numbers([o for o in outcomes if o[key] == value]) for value in sorted({o[key] for o in outcomes})
    }


GOLDEN_SPLITS = ("validation", "test")


def golden_split(product_key: str) -> str:
    """Which part of the golden set a product's held-out views belong to, by a stable hash of its key
    ("<merchant id>/<sku>", the catalog export's sku): "validation" views choose a run's checkpoint (the per-epoch
    check); "test" views are only reported (version_evaluate_golden's by_split), so a chosen recipe is measured on
    views nothing was chosen on."""
    return GOLDEN_SPLITS[zlib.crc32(product_key.encode()) % 2]


def golden_epoch_validator(export: Sequence[Any], label_space: Any = None) -> Callable[..., dict] | None:
    """train()'s per-epoch check, on which a run chooses its checkpoint: held-out shopper views (the golden set's
    seed and strength) of the validation part's products of the catalog being trained on, searched in memory among
    the products' main photos (workers.ml.evaluation's cascade on the network as it is after the epoch). The numbers
    a switch is decided on come from version_evaluate_golden through the real cascade once the version is
    registered. `label_space`: the network's, when it is wider than the export's (rendered products mixed in: the
    export's names come first). None when no product falls in the validation part (a shop of a few products):
    the run then keeps its last epoch, as a run without selection does."""
    from workers.ml.evaluation import retrieval_validator

    gallery, queries = golden_epoch_sets(export, splits=("validation",))["validation"]
    if not queries:
        logger.warning("no catalog product falls in the golden set's validation part: the run keeps its last epoch")
        return None
    return retrieval_validator(gallery, queries, label_space or export.label_space)  # type: ignore[attr-defined]


def golden_epoch_sets(
    export: Sequence[Any], splits: Sequence[str] = GOLDEN_SPLITS
) -> dict[str, tuple[list[Any], list[Any]]]:
    """Per golden split in `splits`: (gallery, queries) for the in-memory check: the main photos of up to
    GOLDEN_EPOCH_GALLERY products, and held-out views of up to GOLDEN_SAMPLE_PRODUCTS of them from that split. A
    split left out is not rendered (a run's per-epoch check needs only the validation part's views), and the others'
    queries are the same either way."""
    from workers.ml.heldout_queries import heldout_query
    from workers.ml.records import Record

    first_image: dict[int, int] = {}
    for index, (number, _) in enumerate(export.items):  # type: ignore[attr-defined]
        first_image.setdefault(number, index)
    numbers = sorted(first_image)
    rng = np.random.default_rng(GOLDEN_SEED)
    if len(numbers) > GOLDEN_EPOCH_GALLERY:
        numbers = sorted(int(n) for n in rng.choice(numbers, size=GOLDEN_EPOCH_GALLERY, replace=False))
    gallery = [export[first_image[number]] for number in numbers]
    sets = {}
    for split in GOLDEN_SPLITS:
        members = [i for i, record in enumerate(gallery) if golden_split(str(record.extra.get("sku", ""))) == split]
        chosen_members = rng.choice(members, size=min(GOLDEN_SAMPLE_PRODUCTS, len(members)), replace=False)
        if split not in splits:
            continue  # (drawn all the same: the next split's draw does not depend on which splits are asked for)
        queries = []
        for chosen in chosen_members:
            record = gallery[int(chosen)]
            query_rng = np.random.default_rng([GOLDEN_SEED, int(record.instance_id)])
            others = query_rng.choice(len(gallery), size=min(GOLDEN_OCCLUDERS, len(gallery)), replace=False)
            photo = heldout_query(
                record.image,
                query_rng,
                occluders=[gallery[int(o)].image for o in others if int(o) != int(chosen)],
                strength=GOLDEN_HELDOUT_STRENGTH,
            )
            queries.append(Record(image=photo, instance_id=record.instance_id, category=record.category))
        sets[split] = (gallery, queries)
    return sets


CALIBRATION_BINS = 10  # equal-count bins of the expected calibration error


def match_calibration(scored: Sequence[tuple[float, bool, int]]) -> dict[str, Any]:
    """A "same product" confidence for this version's result scores: isotonic (non-increasing in the score, which
    is a distance) on every golden result, as knots for catalog.services.golden.match_confidence; with its expected
    calibration error measured across two halves of the queries (fitted on one, measured on the other)."""
    if len(scored) < 2 * CALIBRATION_BINS:
        return {}
    scores = np.asarray([s for s, _, _ in scored], np.float64)
    same = np.asarray([c for _, c, _ in scored], np.float64)
    halves = np.asarray([q % 2 for _, _, q in scored])
    errors = []
    for held in (0, 1):
        fit = halves != held
        if fit.all() or not fit.any():
            continue
        knots = _isotonic_knots(scores[fit], same[fit])
        errors.append(_calibration_error(np.interp(scores[~fit], *knots), same[~fit]))
    xs, ps = _isotonic_knots(scores, same)
    return {
        "scores": [round(float(x), 6) for x in xs],
        "confidences": [round(float(p), 4) for p in ps],
        "ece": round(float(np.mean(errors)), 4) if errors else None,
        "results": int(len(scored)),
    }


def _isotonic_knots(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pool-adjacent-violators: P(same product) non-increasing in the score, as (score, confidence) knots at the
    middle of each pooled block (np.interp between them, flat beyond)."""
    # Equal scores start as one block (one score, one confidence: the knots stay strictly increasing for np.interp,
    # and the order of tied results cannot change the fit).
    unique, tie = np.unique(scores, return_inverse=True)
    totals, counts = np.bincount(tie, weights=same), np.bincount(tie)
    blocks: list[list[float]] = []  # [sum of labels, count, lowest score, highest score]
    for score, total, count in zip(unique, totals, counts):
        blocks.append([float(total), float(count), float(score), float(score)])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] <= blocks[-1][0] / blocks[-1][1]:
            last = blocks.pop()
            blocks[-1] = [blocks[-1][0] + last[0], blocks[-1][1] + last[1], blocks[-1][2], last[3]]
    xs = np.asarray([(low + high) / 2 for _, _, low, high in blocks])
    ps = np.asarray([total / count for total, count, _, _ in blocks])
    return xs, ps


def _calibration_error(confidence: np.ndarray, same: np.ndarray) -> float:
    """Expected calibration error over CALIBRATION_BINS equal-count bins of the confidence."""
    order = np.argsort(confidence, kind="stable")
    bins = np.array_split(order, CALIBRATION_BINS)
    return float(sum(len(b) * abs(confidence[b].mean() - same[b].mean()) for b in bins if len(b)) / len(confidence))
