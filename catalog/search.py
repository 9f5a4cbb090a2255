"""The search cascade, which docs/architecture.md follows from the request: photo -> encoding -> coarse Hamming ->
fine fc7 -> verify -> products -> why. All of it lives in this one module (about 550 lines), so that what a search
does can be read top to bottom in one place; the stages' machinery lives elsewhere (catalog.hamming for the coarse
backends, catalog.geometry for local features, catalog.intake for the photo).

    photo ─ intake (validate, EXIF-rotate, crop box, downscale) ─ encoder (ONNX Runtime) ─┬─ code  ─ coarse: Hamming
                                                                                          ├─ fc7   ─ fine: exact L2
                                                                                          └─ category/attributes/...
1. Coarse: whole Hamming shells of the active version's codes (`catalog.hamming`, memory or SQL backend).
2. Fine: exact Euclidean distance on fc7 over the candidates (in this process, on the vectors the memory index holds;
   in pgvector for the SQL backend), with the shopper's filters, one row per product (its best image); the predicted
   category can boost or restrict. Optional α query expansion (the `expansion` option, settings.SEARCH_QUERY_EXPANSION,
   off by default): the query's fc7 joined by its first n products' best images, the same candidates ranked again.
3. Verify (the `verify` option, on by default: settings.SEARCH_VERIFY): the shopper photo's local features (SIFT,
   extracted with the encoding) matched with RANSAC against those stored for the top
   SEARCH_VERIFY_CANDIDATES products' best images (`catalog.geometry`); the inliers cut the fine score by up to
   VERIFY_WEIGHT (`verify_factor`), so the same object seen from elsewhere overtakes a look-alike.
4. Explain: Hamming and fc7 distances, category/attribute agreement, landmark boxes, inliers; and the calibrated
   probability that the result is the product in the photo (the version's golden-set calibration of the score).
If the filters leave fewer than k products among the candidates, the coarse stage is widened and run again.

Web processes run this module, so it never imports torch: the network runs on ONNX Runtime in this process, or in a
worker on the `search` queue (`query_encode`, catalog.query_encoder).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
from django.conf import settings
from django.db import connection
from PIL import Image

from catalog import geometry, query_encoder, selectors
from catalog.codes import bitstring_pack, version_sql
from catalog.hamming import MEMORY_INDEX, backend_get
from catalog.hamming.candidates import CandidateDepth, CoarseCandidates, ProductFilter
from catalog.hamming.memory import Fc7Ranking
from catalog.intake.images import image_query
from catalog.models import ImageEmbedding, ImageKeypoints, ModelVersion, ProductImage
from catalog.query_payload import QueryEncoding
from catalog.services import golden
from inference.localise import ItemBox

# --- tunables ------------------------------------------------------------------------------------------------------
DEFAULT_K = 12  # one screen of results on the shopper page
MAX_K = 100  # beyond this a visual search is browsing, and the fine stage pays for every extra product
# Coarse depth: whole Hamming shells until COARSE_CANDIDATE_SHARE of the rows the query may see (the shop's catalog),
# at least COARSE_MIN_CANDIDATES and k x COARSE_CANDIDATES_PER_RESULT rows, at most COARSE_MAX_CANDIDATES. Chosen on
# bench_coarse's validation split (docs/benchmarks.md, "Coarse depth"): version 0's codes, held-out shopper photos.
COARSE_CANDIDATE_SHARE = 0.04
COARSE_MIN_CANDIDATES = 200
COARSE_CANDIDATES_PER_RESULT = 20  # products have several images and filters drop some: k products need ~20x rows
COARSE_MAX_CANDIDATES = 4_000  # a whole shell can be big; the fine stage over 4k rows still takes a few ms
COARSE_WIDEN_FACTOR = 8  # when filters starve the fine stage, ask the coarse stage for this many times more
COARSE_WIDEN_ROUNDS = 3  # then give up widening step by step and take everything (exhaustive)
FINE_CARDS_MARGIN = 8  # unfiltered, the fine stage reads the cards of k products and this many more at once
COARSE_EVERYTHING = int(np.iinfo(np.int32).max)  # the candidate count of that last round
CATEGORY_BOOST = 0.15  # "boost": a product of the predicted category has its fc7 distance cut by up to 15%
CATEGORY_RESTRICT_MIN_CONFIDENCE = 0.5  # "restrict" only trusts a confident prediction (else it boosts)
# Verify stage: fused score = fine score x verify_factor(inliers), from 1 (no inliers) down to 1 - VERIFY_WEIGHT at
# VERIFY_INLIERS_FULL inliers or more, linear between. Chance matches between different products rarely reach
# geometry.MIN_MATCHES, below which a candidate has 0 inliers. Chosen on the held-out validation split, two seeds
# (README, "Geometric verification"); with RootSIFT and N = 30, full effect at 15 / 20 / 25 / 30 / 40 inliers put
# 163 / 166 / 169 / 170 / 170 of 400 photos first: 30, mid-plateau.
VERIFY_INLIERS_FULL = 30
VERIFY_WEIGHT = 0.8
# N = 30, chosen on the validation split with RootSIFT matching (166 of 400 photos at rank 1 against 161 at N = 20
# and 164 at N = 40; README, "Geometric verification"). settings.SEARCH_VERIFY_CANDIDATES wins.
DEFAULT_VERIFY_CANDIDATES = 30
CATEGORY_MODES = ("off", "boost", "restrict")
# bench_retrieval, validation split, version 0, held-out shopper photos: the boost cost R@1 0.45 -> 0.22 (Fashion-MNIST)
# and 0.42 -> 0.32 (rendered), because the predicted category of a shopper's photo is right only 22-44% of the time.
# A shopper can still ask for "boost" or "restrict".
DEFAULT_CATEGORY_MODE = "off"
MAX_EXPANSION = 20  # query expansion averages at most this many neighbours: beyond, they are mostly other products
# Item fusion (SearchOptions.item_fusion, settings.SEARCH_ITEM_FUSION): the photo and its best item box, encoded both
# and mixed. Chosen on the validation split (docs/benchmarks.md, "Item boxes": 1,000 products, two seeds, 400 photos):
# weight 0.5 took R@1 / R@10 from 0.350 / 0.513 to 0.368 / 0.553 (it gained on both seeds; the box alone lost); on the
# test split it gained in every group (three seeds; README) and every real photo stayed first. It costs a second
# pass of the network when a box is found.
DEFAULT_ITEM_FUSION = 0.5
SQL_FOR_SELECTIVE_FILTERS = "sql"  # where a starved filtered query goes: it filters inside the coarse stage
DEFAULT_BACKEND = "memory"  # bench_search: ~10x faster than the HNSW walk at 1M; settings.SEARCH_COARSE_BACKEND wins


class SearchUnavailable(RuntimeError):
    """Search cannot answer right now (no active model version, no worker): a 503, not the shopper's fault."""


class ProductNotSearchable(LookupError):
    """The product of a "similar products" query does not exist, is hidden, or has no embedding yet."""


# --- inputs --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SearchOptions:
    k: int = DEFAULT_K
    product_filter: ProductFilter = field(default_factory=ProductFilter)
    category_mode: str = DEFAULT_CATEGORY_MODE  # off | boost | restrict: what the predicted category does
    backend: str | None = None  # coarse backend; None = settings.SEARCH_COARSE_BACKEND (default "memory")
    radius: int | None = None  # optional Hamming radius: candidates farther than this are never considered
    verify: bool | None = None  # geometric verification of the top candidates; None = settings.SEARCH_VERIFY
    # α query expansion (expanded_query): how many of the first products join the query (0 = off) and the weight's
    # exponent; None = settings.SEARCH_QUERY_EXPANSION / SEARCH_QUERY_EXPANSION_ALPHA.
    expansion: int | None = None
    expansion_alpha: float | None = None
    # Item fusion (inference.localise): the photo cropped to its best item box is encoded too and mixed in with this
    # weight (0 = the whole photo alone); None = settings.SEARCH_ITEM_FUSION. Not applied to a shopper's own box.
    item_fusion: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K:
            raise ValueError(f"k must be between 1 and {MAX_K}")
        if self.category_mode not in CATEGORY_MODES:
            raise ValueError(f"category_mode must be one of {CATEGORY_MODES}")
        if self.expansion is not None and not 0 <= self.expansion <= MAX_EXPANSION:
            raise ValueError(f"expansion must be between 0 and {MAX_EXPANSION}")
        if self.expansion_alpha is not None and not 0 <= self.expansion_alpha <= 100:
            raise ValueError("expansion_alpha must be between 0 and 100")
        if self.item_fusion is not None and not 0 <= self.item_fusion <= 1:
            raise ValueError("item_fusion must be between 0 and 1")


# --- outputs -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Explanation:
    hamming_distance: int
    code_bits: int
    fc7_distance: float
    category_predicted: str
    category_confidence: float | None
    category_catalog: str
    category_agrees: bool | None  # None when the model predicts no category
    attributes_predicted: dict[str, float]
    attributes_catalog: list[str]
    attributes_agreeing: list[str]
    query_landmarks: list[list[float]]
    result_landmarks: list[list[float]]
    query_landmark_box: list[float] | None  # [x0, y0, x1, y1] around the visible landmarks, fractions of the image
    result_landmark_box: list[float] | None
    fine_score: float  # the fine stage's score (fc7 distance, less any category boost), before verification
    inliers: int | None  # local-feature matches a RANSAC homography explains; None = not verified
    tentative_matches: int | None  # matches that passed the ratio test, before RANSAC; None = not verified
    verify_factor: float  # the score is fine_score x this (1.0: no geometric evidence, or not verified)


@dataclass(frozen=True)
class ProductCard:
    """What a result shows of a product, read in the same query as the ranking (no ORM round trip per search)."""

    pk: int
    merchant_id: int
    merchant_slug: str
    sku: str
    title: str
    category: str
    attributes: list[str]
    price: Decimal | None
    url: str


@dataclass(frozen=True)
class ProductHit:
    rank: int
    product: ProductCard
    image_id: int  # the product's best-matching image
    image_url: str  # where the storage serves it (relative unless the storage says otherwise)
    embedding_id: int
    score: float  # what the ranking sorts by: fc7 distance, less any category boost, times the verify factor
    explanation: Explanation
    # The calibrated probability that this is the shopper's product (the version's golden-set calibration of the
    # score) and its label, "exact match" or "similar"; None for a version without calibration.
    confidence: float | None = None
    match: str | None = None


@dataclass(frozen=True)
class CoarseReport:
    backend: str
    candidates: int
    radius: int
    exhaustive: bool
    rounds: int  # 1 unless filters starved the fine stage and the coarse stage was widened
    notes: tuple[str, ...]


@dataclass(frozen=True)
class SearchResult:
    version: ModelVersion
    query: QueryEncoding
    hits: list[ProductHit]
    coarse: CoarseReport
    timings_ms: dict[str, float]  # intake, encode, keypoints, coarse, fine, verify, explain, total (stages that ran)
    # The coarse stage's candidates (embedding ids), for per-stage recall in benchmarks and evaluations; not served.
    candidate_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)


# --- entry points --------------------------------------------------------------------------------------------------
def search_photo(
    *, data: bytes, box: tuple[float, float, float, float] | None = None, options: SearchOptions
) -> SearchResult:
    """A shopper's photo -> ranked products. Raises IntakeError (bad input) or SearchUnavailable."""
    started = time.perf_counter()
    # The photo is decoded on a pool thread while this one asks which version serves, and encoded on a pool thread
    # while this one polls the change log for the coarse stage: the two database round trips (0.3-0.7 ms each on a
    # quiet machine, 5-15 ms on a busy one) then cost the shopper nothing. Only this thread touches the database.
    # Bad input is the shopper's 400 even while search is unavailable. Nothing is stored, so nothing is re-encoded.
    decoding = _overlap_pool().submit(image_query, data, box=box, max_side=query_encoder.QUERY_MAX_SIDE)
    try:
        version = version_serving()
    except SearchUnavailable:
        decoding.result()
        raise
    image = decoding.result()
    intake_done = time.perf_counter()
    encoding_future = _overlap_pool().submit(
        query_encode,
        image=image,
        version=version,
        keypoints=verify_enabled(options),
        item_weight=0.0 if box is not None else item_fusion_weight(options),  # the shopper's own box is the item
    )
    polled = _poll_index(version=version, options=options)
    encoded = encoding_future.result()
    encoding = encoded.encoding
    if box is not None:  # the boxes found in the crop, as fractions of the whole photo the page shows
        found = [ItemBox(*item).within(box).as_row() for item in encoding.item_boxes]
        encoding = dataclasses.replace(encoding, item_boxes=found)
    result = search_encoding(encoding=encoding, version=version, options=options, index_polled=polled)
    timings = {
        "intake": _ms(intake_done - started),
        **encoded.timings_ms,
        **({"poll": polled} if polled is not None else {}),
        **result.timings_ms,
        "total": _ms(time.perf_counter() - started),
    }
    return dataclasses.replace(result, timings_ms=timings)


@functools.cache
def _overlap_pool() -> ThreadPoolExecutor:
    """Threads that decode and encode a search's photo while the search's own thread talks to the database: one per
    search the process runs at once (catalog.api's SEARCH_MAX_CONCURRENT); more would only queue for the cores."""
    return ThreadPoolExecutor(max_workers=max(1, int(settings.SEARCH_MAX_CONCURRENT)), thread_name_prefix="search")


def _poll_index(*, version: ModelVersion, options: SearchOptions) -> float | None:
    """Bring the memory index up to date for this search (the change-log poll; a load if it holds another version);
    how long that took (ms), or None when the search's coarse backend is not the memory index."""
    if _backend_name(options) != MEMORY_INDEX.name:
        return None
    started = time.perf_counter()
    MEMORY_INDEX.refresh(version_id=version.pk, code_bits=version.code_bits)
    return _ms(time.perf_counter() - started)


def _backend_name(options: SearchOptions) -> str:
    return options.backend or str(getattr(settings, "SEARCH_COARSE_BACKEND", DEFAULT_BACKEND))


def similar_products(*, product_id: int, options: SearchOptions) -> SearchResult:
    """Products that look like this one: its main image's stored encoding is the query; it is left out itself."""
    started = time.perf_counter()
    version = version_serving()
    embedding = (
        ImageEmbedding.objects.filter(model_version=version, product_id=product_id, product__active=True)
        .order_by("image__position", "image_id")
        .first()
    )
    if embedding is None:
        raise ProductNotSearchable(f"product {product_id} does not exist, is hidden, or is not indexed yet")
    encoding = QueryEncoding(
        model_version_id=version.pk,
        code=bitstring_pack(str(embedding.code)),
        fc7=np.asarray(embedding.fc7, np.float32),
        category=embedding.category,
        category_confidence=embedding.category_confidence,
        attributes=dict(embedding.attributes or {}),
        landmarks=list(embedding.landmarks or []),
        keypoints=_stored_keypoints([embedding.image_id]).get(embedding.image_id) if verify_enabled(options) else None,
    )
    scoped = dataclasses.replace(
        options, product_filter=ProductFilter(**{**options.product_filter.__dict__, "exclude_product_id": product_id})
    )
    result = search_encoding(encoding=encoding, version=version, options=scoped)
    timings = {**result.timings_ms, "total": _ms(time.perf_counter() - started)}
    # The calibration is fitted on shopper photos of a product, whose scores a catalog photo of another product
    # does not share: no confidence here rather than a made-up one.
    hits = [dataclasses.replace(hit, confidence=None, match=None) for hit in result.hits]
    return dataclasses.replace(result, hits=hits, timings_ms=timings)


def version_serving() -> ModelVersion:
    version = selectors.model_version_searched()
    if version is None:
        raise SearchUnavailable("no model version is active yet: the catalog is still being indexed")
    return version


def query_encode(
    *, image: Image.Image, version: ModelVersion, keypoints: bool = False, item_weight: float = 0.0
) -> query_encoder.EncodedQuery:
    """Encode the query photo: in this process on ONNX Runtime, or by a worker on the `search` queue
    (settings.SEARCH_ENCODER; catalog.query_encoder). Never with torch: web processes do not load it."""
    try:
        return query_encoder.query_encode(image=image, version=version, keypoints=keypoints, item_weight=item_weight)
    except query_encoder.EncoderUnavailable as exc:
        raise SearchUnavailable(str(exc)) from exc


# --- the cascade proper --------------------------------------------------------------------------------------------
def search_encoding(
    *, encoding: QueryEncoding, version: ModelVersion, options: SearchOptions, index_polled: float | None = None
) -> SearchResult:
    """Coarse -> fine -> group by product -> explain, for an already encoded query. `index_polled`: the memory
    index was brought up to date for this search already (search_photo polls while the photo is encoded)."""
    if encoding.model_version_id != version.pk:
        raise ValueError(f"query encoded by version {encoding.model_version_id}, searching version {version.pk}")
    backend = backend_get(_backend_name(options))
    product_filter, boost = _category_policy(encoding=encoding, options=options)
    depth = candidate_depth(k=options.k, radius=options.radius)
    verify_count = verify_candidates() if verify_enabled(options) and encoding.keypoints is not None else 0
    coarse_ms = fine_ms = 0.0
    rounds = 0
    while True:
        rounds += 1
        started = time.perf_counter()
        if index_polled is not None and backend is MEMORY_INDEX:
            candidates = MEMORY_INDEX.candidates(
                version_id=version.pk,
                code_bits=version.code_bits,
                code=encoding.code,
                depth=depth,
                product_filter=product_filter,
                poll=False,
            )
        else:
            candidates = backend.candidates(
                version_id=version.pk,
                code_bits=version.code_bits,
                code=encoding.code,
                depth=depth,
                product_filter=product_filter,
            )
        coarse_done = time.perf_counter()
        rows = fine_rank(
            candidates=candidates,
            version=version,
            fc7=encoding.fc7,
            product_filter=product_filter,
            k=max(options.k, verify_count),  # the verify stage may lift any of its candidates into the k
            boost_category=encoding.category if boost else "",
            boost=boost,
        )
        coarse_ms += _ms(coarse_done - started)
        fine_ms += _ms(time.perf_counter() - coarse_done)
        if len(rows) >= options.k or candidates.exhaustive or depth.min_count >= COARSE_EVERYTHING:
            break  # (a round that asked for every row is the last, whatever a backend says of exhaustiveness)
        depth = _widen(depth, rounds=rounds)
        if backend.name != SQL_FOR_SELECTIVE_FILTERS and _filters_beyond_memory(product_filter):
            # The memory index cannot see category/attribute/price: widening it would drag ever more rows through
            # the fine stage. The SQL backend applies those filters inside the coarse query itself.
            backend = backend_get(SQL_FOR_SELECTIVE_FILTERS)
    expansion = expansion_count(options)
    if expansion and rows:
        # Query expansion: the same candidates, the same filters, ranked again for the expanded query.
        started = time.perf_counter()
        rows = fine_rank(
            candidates=candidates,
            version=version,
            fc7=expanded_query(
                fc7=encoding.fc7, rows=rows[:expansion], version=version, alpha=expansion_alpha(options)
            ),
            product_filter=product_filter,
            k=max(options.k, verify_count),
            boost_category=encoding.category if boost else "",
            boost=boost,
        )
        fine_ms += _ms(time.perf_counter() - started)
    verify_ms: dict[str, float] = {}
    if verify_count:
        started = time.perf_counter()
        rows = verify_rank(rows=rows, keypoints=encoding.keypoints or b"", count=verify_count)
        verify_ms["verify"] = _ms(time.perf_counter() - started)
    rows = rows[: options.k]
    started = time.perf_counter()
    hits = _explain(rows=rows, encoding=encoding, version=version)
    explain_ms = _ms(time.perf_counter() - started)
    report = CoarseReport(
        backend=backend.name,
        candidates=len(candidates),
        radius=candidates.radius,
        exhaustive=candidates.exhaustive,
        rounds=rounds,
        notes=candidates.notes,
    )
    timings = {"coarse": coarse_ms, "fine": fine_ms, **verify_ms, "explain": explain_ms}
    timings["total"] = round(sum(timings.values()), 3)
    return SearchResult(
        version=version,
        query=encoding,
        hits=hits,
        coarse=report,
        timings_ms=timings,
        candidate_ids=candidates.embedding_ids,
    )


def item_fusion_weight(options: SearchOptions) -> float:
    """How much of the best item box's encoding is mixed into a photo's (0: none)."""
    if options.item_fusion is not None:
        return options.item_fusion
    return float(getattr(settings, "SEARCH_ITEM_FUSION", DEFAULT_ITEM_FUSION))


def expansion_count(options: SearchOptions) -> int:
    count = options.expansion if options.expansion is not None else getattr(settings, "SEARCH_QUERY_EXPANSION", 0)
    return max(0, min(MAX_EXPANSION, int(count)))


def expansion_alpha(options: SearchOptions) -> float:
    alpha = options.expansion_alpha
    return float(alpha if alpha is not None else getattr(settings, "SEARCH_QUERY_EXPANSION_ALPHA", 3.0))


def expanded_query(*, fc7: np.ndarray, rows: Sequence[FineRow], version: ModelVersion, alpha: float) -> np.ndarray:
    """α query expansion: the query's fc7 plus each of these products' best image's fc7 (the rows are the fine
    stage's first products, one per product, after the shopper's filters), weighted by its cosine similarity to the
    query to the power alpha (negative similarities count 0); scaled back to the query's norm, so fc7 distances keep
    their range. The vectors are read from the memory index where it holds them, else from PostgreSQL."""
    query = np.asarray(fc7, np.float32).ravel()
    norm = float(np.linalg.norm(query))
    if not rows or norm == 0.0:
        return query
    ids = np.asarray([row.embedding_id for row in rows], np.int64)
    vectors = MEMORY_INDEX.fc7_of(version_id=version.pk, embedding_ids=ids)
    if vectors is None:
        stored = dict(ImageEmbedding.objects.filter(id__in=ids.tolist()).values_list("id", "fc7"))
        vectors = np.stack([np.asarray(stored[int(i)], np.float32) for i in ids])
    lengths = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(lengths > 0, lengths, 1.0)
    unit = query / norm
    weights = np.clip(vectors @ unit, 0.0, None) ** alpha
    expanded = unit + weights @ vectors
    length = float(np.linalg.norm(expanded))
    return (expanded * (norm / length)).astype(np.float32) if length > 0 else query


def _filters_beyond_memory(product_filter: ProductFilter) -> bool:
    return bool(
        product_filter.category
        or product_filter.attributes
        or product_filter.price_min is not None
        or product_filter.price_max is not None
    )


def candidate_depth(*, k: int, radius: int | None = None) -> CandidateDepth:
    """The coarse stage's depth for k results; the backend raises it to COARSE_CANDIDATE_SHARE of the rows it can
    return (CandidateDepth.for_rows), so it grows with the shop."""
    min_count = max(COARSE_MIN_CANDIDATES, k * COARSE_CANDIDATES_PER_RESULT)
    return CandidateDepth(
        min_count=min_count,
        max_count=max(min_count, COARSE_MAX_CANDIDATES),
        radius=radius,
        share=COARSE_CANDIDATE_SHARE,
    )


def _widen(depth: CandidateDepth, *, rounds: int) -> CandidateDepth:
    if rounds > COARSE_WIDEN_ROUNDS:
        return CandidateDepth(min_count=COARSE_EVERYTHING, max_count=COARSE_EVERYTHING, radius=depth.radius)  # all
    return CandidateDepth(
        min_count=depth.min_count * COARSE_WIDEN_FACTOR,
        max_count=depth.max_count * COARSE_WIDEN_FACTOR,
        radius=depth.radius,
        share=depth.share,
    )


def _category_policy(*, encoding: QueryEncoding, options: SearchOptions) -> tuple[ProductFilter, float]:
    """The filter to apply and the boost to give, from the mode and how sure the model is of the category."""
    product_filter = options.product_filter
    if options.category_mode == "off" or not encoding.category or product_filter.category:
        return product_filter, 0.0  # a category the shopper chose beats the one the model guessed
    confidence = float(encoding.category_confidence or 0.0)
    if options.category_mode == "restrict" and confidence >= CATEGORY_RESTRICT_MIN_CONFIDENCE:
        return ProductFilter(**{**product_filter.__dict__, "category": encoding.category}), 0.0
    return product_filter, CATEGORY_BOOST * confidence


@dataclass(frozen=True)
class FineRow:
    product: ProductCard
    embedding_id: int
    image_id: int
    image_file: str
    hamming: int
    fc7_distance: float
    score: float
    landmarks: list[list[float]]
    fine_score: float | None = None  # the score before the verify stage (None: same as score)
    verification: geometry.Verification | None = None  # None: not verified
    verify_factor: float = 1.0


def fine_rank(
    *,
    candidates: CoarseCandidates,
    version: ModelVersion,
    fc7: np.ndarray,
    product_filter: ProductFilter,
    k: int,
    boost_category: str = "",
    boost: float = 0.0,
) -> list[FineRow]:
    """Exact fc7 L2 over the candidates, filtered, one row per product (its best image), best first; the k winners
    come back with what their result cards show.

    Where the vectors are read from: the memory index holds each embedding's fc7 (float32) beside its code, so the
    distances and each product's best image are computed in this process (`MemoryCodeIndex.fc7_rank`: candidates
    x fc7_dim x 4 bytes read from memory), and the winners' cards come from the process's card cache
    (`catalog.hamming.cards`, kept exact by the change log): no database round trip unless a card is missing. A
    price/category/attribute filter or the category boost is applied by one query that reads the winners' cards.
    Otherwise (the SQL backend, or SEARCH_FC7_IN_MEMORY off) PostgreSQL computes the distances over the
    candidates' rows."""
    if len(candidates) == 0:
        return []
    ranked = None
    if candidates.backend == MEMORY_INDEX.name:
        ranked = MEMORY_INDEX.fc7_rank(
            version_id=version.pk, embedding_ids=candidates.embedding_ids, fc7=fc7, rows_hint=candidates.rows
        )
    if ranked is not None:
        if not (boost or _filters_beyond_memory(product_filter)):
            # The order is the distance order: the first k products that are still there are the answer, and their
            # cards come from this process's card cache (a miss: one query by primary key for the window's misses).
            return _ranked_rows(ranked=ranked, candidates=candidates, version=version, k=k)
        # Filters and the boost see every product: one query applies them and reads the winners' cards.
        found = _fine_cards(
            product_ids=ranked.product_ids,
            embedding_ids=ranked.embedding_ids,
            distances=ranked.distances,
            version=version,
            product_filter=product_filter,
            k=k,
            boost_category=boost_category,
            boost=boost,
        )
        return [_fine_row(row, candidates) for row in found]
    where = product_filter.where_sql("p")
    # `id = ANY(array)` rather than a join with unnest(): the planner then always probes the primary key, where a
    # join tempts it into hashing the whole table on small catalogs.
    sql = (
        "WITH best AS ("
        "  SELECT DISTINCT ON (e.product_id) e.product_id, e.id AS embedding_id, e.image_id,"
        "   (e.fc7 <-> %s::vector) AS fc7_distance, (p.category = %s) AS category_match, e.landmarks"
        "  FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id"
        f"  WHERE e.id = ANY(%s::bigint[]) AND {version_sql('e', version.pk)} AND {where.sql}"
        "  ORDER BY e.product_id, fc7_distance, e.id),"
        " top AS ("
        "  SELECT product_id, embedding_id, image_id, fc7_distance,"
        "   fc7_distance * (1 - %s * category_match::int) AS score, landmarks"
        "  FROM best ORDER BY score, fc7_distance, product_id LIMIT %s)"
        " SELECT t.product_id, t.embedding_id, t.image_id, i.file, t.fc7_distance, t.score, t.landmarks,"
        "  p.merchant_id, m.slug, p.sku, p.title, p.category, p.attributes, p.price, p.url"
        " FROM top t JOIN catalog_productimage i ON i.id = t.image_id JOIN catalog_product p ON p.id = t.product_id"
        " JOIN catalog_merchant m ON m.id = p.merchant_id"
        " ORDER BY t.score, t.fc7_distance, t.product_id"
    )
    params = [
        _vector_literal(fc7),
        boost_category,
        candidates.embedding_ids.tolist(),
        *where.params,
        float(boost),
        k,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        found = cursor.fetchall()
    return [_fine_row(row, candidates) for row in found]


@dataclass(frozen=True)
class ResultCard:
    """What the fine stage needs of a ranked embedding besides its distance: its product's card, its image and its
    landmarks. Kept per process by the memory index's card cache (catalog.hamming.cards)."""

    product: ProductCard
    image_id: int
    image_file: str
    landmarks: list[list[float]]


def _ranked_rows(*, ranked: Fc7Ranking, candidates: CoarseCandidates, version: ModelVersion, k: int) -> list[FineRow]:
    """The first k products of an in-memory ranking whose cards exist, as FineRows. Cards are taken from the card
    cache; the misses of each window of k + FINE_CARDS_MARGIN products are read in one query, which also leaves out
    what went hidden or was deleted since the change-log poll (then the next window is read)."""
    rows: list[FineRow] = []
    step = k + FINE_CARDS_MARGIN
    for start in range(0, len(ranked.product_ids), step):
        window = slice(start, start + step)
        embedding_ids = ranked.embedding_ids[window].tolist()
        cards, token = MEMORY_INDEX.result_cards(embedding_ids)
        missing = [embedding_id for embedding_id in embedding_ids if embedding_id not in cards]
        if missing:
            read = _result_cards_read(embedding_ids=missing, version=version)
            MEMORY_INDEX.cards.put({e: (card.product.pk, card) for e, card in read.items()}, token=token)
            cards.update(read)
        hammings = candidates.distances[ranked.positions[window]].tolist()
        for embedding_id, distance, hamming in zip(embedding_ids, ranked.distances[window].tolist(), hammings):
            card = cards.get(embedding_id)
            if card is None:
                continue
            rows.append(
                FineRow(
                    product=card.product,
                    embedding_id=embedding_id,
                    image_id=card.image_id,
                    image_file=card.image_file,
                    hamming=int(hamming),
                    fc7_distance=distance,
                    score=distance,
                    landmarks=card.landmarks,
                )
            )
            if len(rows) >= k:
                return rows
    return rows


def _result_cards_read(*, embedding_ids: list[int], version: ModelVersion) -> dict[int, ResultCard]:
    """The cards of these embeddings of active products, in one query by primary key."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT e.id, e.image_id, i.file, e.landmarks, p.id, p.merchant_id, m.slug, p.sku, p.title, p.category,"
            " p.attributes, p.price, p.url"
            " FROM catalog_imageembedding e JOIN catalog_productimage i ON i.id = e.image_id"
            " JOIN catalog_product p ON p.id = e.product_id JOIN catalog_merchant m ON m.id = p.merchant_id"
            f" WHERE e.id = ANY(%s::bigint[]) AND p.active AND {version_sql('e', version.pk)}",
            [embedding_ids],
        )
        found = cursor.fetchall()
    cards = {}
    for (embedding_id, image_id, image_file, landmarks, product_id, merchant_id, merchant_slug, sku, title, category,
         attributes, price, url) in found:  # fmt: skip
        product = _product_card(product_id, merchant_id, merchant_slug, sku, title, category, attributes, price, url)
        cards[embedding_id] = ResultCard(
            product=product, image_id=image_id, image_file=image_file, landmarks=_json(landmarks) or []
        )
    return cards


def _fine_cards(
    *,
    product_ids: np.ndarray,
    embedding_ids: np.ndarray,
    distances: np.ndarray,
    version: ModelVersion,
    product_filter: ProductFilter,
    k: int,
    boost_category: str,
    boost: float,
) -> list[tuple]:
    """Products already ranked in memory (each with its best embedding and distance): the shopper's filters and the
    category boost applied to them, the best k, and their cards, in one query (the same columns as fine_rank's)."""
    where = product_filter.where_sql("p")
    sql = (
        "WITH top AS ("
        "  SELECT c.product_id, c.embedding_id, c.fc7_distance,"
        "   c.fc7_distance * (1 - %s * (p.category = %s)::int) AS score"
        "  FROM unnest(%s::bigint[], %s::bigint[], %s::float8[]) AS c(product_id, embedding_id, fc7_distance)"
        "  JOIN catalog_product p ON p.id = c.product_id"
        f"  WHERE {where.sql}"
        "  ORDER BY score, c.fc7_distance, c.product_id LIMIT %s)"
        " SELECT t.product_id, t.embedding_id, e.image_id, i.file, t.fc7_distance, t.score, e.landmarks,"
        "  p.merchant_id, m.slug, p.sku, p.title, p.category, p.attributes, p.price, p.url"
        " FROM top t JOIN catalog_imageembedding e ON e.id = t.embedding_id"
        " JOIN catalog_productimage i ON i.id = e.image_id JOIN catalog_product p ON p.id = t.product_id"
        " JOIN catalog_merchant m ON m.id = p.merchant_id"
        f" WHERE {version_sql('e', version.pk)}"
        " ORDER BY t.score, t.fc7_distance, t.product_id"
    )
    params = [
        float(boost),
        boost_category,
        product_ids.tolist(),
        embedding_ids.tolist(),
        distances.astype(np.float64).tolist(),
        *where.params,
        k,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _product_card(
    product_id: int,
    merchant_id: int,
    merchant_slug: str,
    sku: str,
    title: str,
    category: str,
    attributes: Any,
    price: Any,
    url: str,
) -> ProductCard:
    """A product's card from the columns both card queries read (the fine stage's and the card cache's misses)."""
    return ProductCard(
        pk=product_id,
        merchant_id=merchant_id,
        merchant_slug=merchant_slug,
        sku=sku,
        title=title,
        category=category,
        attributes=list(_json(attributes) or []),
        price=price,
        url=url,
    )


def _fine_row(found: tuple, candidates: CoarseCandidates) -> FineRow:
    """One row of the fine stage's query (its column order) as a FineRow, with the candidate's Hamming distance."""
    (product_id, embedding_id, image_id, image_file, fc7_distance, score, landmarks, merchant_id, merchant_slug,
     sku, title, category, attributes, price, url) = found  # fmt: skip
    card = _product_card(product_id, merchant_id, merchant_slug, sku, title, category, attributes, price, url)
    return FineRow(
        product=card,
        embedding_id=embedding_id,
        image_id=image_id,
        image_file=image_file,
        hamming=int(candidates.distances[np.flatnonzero(candidates.embedding_ids == embedding_id)[0]]),
        fc7_distance=float(fc7_distance),
        score=float(score),
        landmarks=_json(landmarks) or [],
    )


def _explain(*, rows: Sequence[FineRow], encoding: QueryEncoding, version: ModelVersion) -> list[ProductHit]:
    storage = ProductImage._meta.get_field("file").storage
    predicted_attributes = set(encoding.attributes)
    calibration = version_calibration(version)
    hits = []
    for rank, row in enumerate(rows, start=1):
        product = row.product
        confidence = None if calibration is None else round(calibration.confidence(row.score), 4)
        catalog_attributes = list(product.attributes or [])
        explanation = Explanation(
            hamming_distance=row.hamming,
            code_bits=version.code_bits,
            fc7_distance=round(row.fc7_distance, 6),
            category_predicted=encoding.category,
            category_confidence=encoding.category_confidence,
            category_catalog=product.category,
            category_agrees=(encoding.category == product.category) if encoding.category else None,
            attributes_predicted=encoding.attributes,
            attributes_catalog=catalog_attributes,
            attributes_agreeing=sorted(predicted_attributes & set(catalog_attributes)),
            query_landmarks=encoding.landmarks,
            result_landmarks=row.landmarks,
            query_landmark_box=landmark_box(encoding.landmarks),
            result_landmark_box=landmark_box(row.landmarks),
            fine_score=round(row.score if row.fine_score is None else row.fine_score, 6),
            inliers=None if row.verification is None else row.verification.inliers,
            tentative_matches=None if row.verification is None else row.verification.matches,
            verify_factor=round(row.verify_factor, 6),
        )
        hits.append(
            ProductHit(
                rank=rank,
                product=product,
                image_id=row.image_id,
                image_url=storage.url(row.image_file),
                embedding_id=row.embedding_id,
                score=round(row.score, 6),
                explanation=explanation,
                confidence=confidence,
                match=golden.match_label(confidence),
            )
        )
    return hits


# Per process: version id -> (the evaluation the calibration came from, the calibration). A switch brings a version
# this process has not read yet, a re-evaluation a new evaluation time: either reads the calibration again.
_calibrations: dict[int, tuple[str | None, golden.MatchCalibration | None]] = {}


def version_calibration(version: ModelVersion) -> golden.MatchCalibration | None:
    """The version's "same product" calibration (None: it has none), read once per process and evaluation: the
    version a search reads (selectors.model_version_searched) carries only the time of its golden evaluation."""
    if "metrics" in version.__dict__:  # loaded whole (an evaluation, a benchmark): the calibration is at hand
        return golden.match_calibration_of(golden.version_golden(version))
    evaluated_at = getattr(version, "golden_evaluated_at", None)
    kept = _calibrations.get(version.pk)
    if kept is None or kept[0] != evaluated_at:
        kept = (evaluated_at, golden.match_calibration_of(selectors.model_version_golden(version_id=version.pk)))
        _calibrations[version.pk] = kept
    return kept[1]


def verify_enabled(options: SearchOptions) -> bool:
    return bool(settings.SEARCH_VERIFY if options.verify is None else options.verify)


def verify_candidates() -> int:
    return max(0, int(getattr(settings, "SEARCH_VERIFY_CANDIDATES", DEFAULT_VERIFY_CANDIDATES)))


def verify_factor(inliers: int) -> float:
    """What the verify stage multiplies a fine score by: 1 for no inliers, falling linearly to 1 - VERIFY_WEIGHT at
    VERIFY_INLIERS_FULL inliers and beyond. More inliers never rank a product lower."""
    return 1.0 - VERIFY_WEIGHT * min(1.0, max(0, inliers) / VERIFY_INLIERS_FULL)


def verify_rank(*, rows: Sequence[FineRow], keypoints: bytes, count: int) -> list[FineRow]:
    """The verify stage: the first `count` rows' best images matched geometrically against the query's local
    features (their stored keypoints read in one query), scores multiplied by verify_factor, all rows re-sorted.
    A row whose image has no keypoints yet stays unverified (factor 1). Since factors are <= 1 and the rows beyond
    `count` score no better than those within, the re-sorted order is the order of the fused scores."""
    query = _unpacked(keypoints)
    if query is None:
        return list(rows)
    head, tail = list(rows[:count]), list(rows[count:])
    stored = _stored_keypoints([row.image_id for row in head])
    checked = geometry.verify_many(query, [_unpacked(stored.get(row.image_id)) for row in head])
    verified = []
    for row, verification in zip(head, checked):
        factor = 1.0 if verification is None else verify_factor(verification.inliers)
        verified.append(
            dataclasses.replace(
                row, fine_score=row.score, score=row.score * factor, verification=verification, verify_factor=factor
            )
        )
    verified.sort(key=lambda row: (row.score, row.fc7_distance, row.product.pk))
    return verified + tail


def _stored_keypoints(image_ids: Sequence[int]) -> dict[int, bytes]:
    found = ImageKeypoints.objects.filter(image_id__in=list(image_ids)).values_list("image_id", "data")
    return {image_id: bytes(data) for image_id, data in found}


def _unpacked(data: bytes | None) -> geometry.LocalFeatures | None:
    """Stored keypoints, or None (the candidate stays unverified) when there are none or they cannot be read."""
    try:
        return None if data is None else geometry.unpack(data)
    except ValueError:  # another format version of catalog.geometry: unverified rather than a failed search
        return None


LANDMARK_VISIBLE = 0.5  # visibility probability above which a landmark counts as seen


def landmark_box(landmarks: Sequence[Sequence[float]]) -> list[float] | None:
    """[x0, y0, x1, y1] around the visible landmarks (fractions of the image), None when none is visible."""
    visible = [(x, y) for x, y, *rest in landmarks if (rest[0] if rest else 1.0) >= LANDMARK_VISIBLE]
    if not visible:
        return None
    xs, ys = zip(*visible)
    return [round(max(0.0, min(xs)), 4), round(max(0.0, min(ys)), 4), round(min(1.0, max(xs)), 4),
            round(min(1.0, max(ys)), 4)]  # fmt: skip


def _vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(f"{float(x):.7g}" for x in np.asarray(vector).ravel()) + "]"


def _json(value: Any) -> Any:
    if isinstance(value, str):
        import json

        return json.loads(value)
    return value


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
