"""`manage.py bench_verify`: what geometric verification costs (catalog.geometry, the search's verify stage).

On the held-out benchmark's validation split (catalog photos on white, shopper photos from
workers.ml.heldout_queries): the bytes stored per catalog image, the extraction time per catalog image (ingest, in the
worker) and per query photo (query encode, in the worker), and the verify stage as the web process runs it for N
candidates, end to end: one read of the N candidates' stored keypoints from PostgreSQL, unpacking, matching and
RANSAC (`catalog.search.verify_rank`). Pinned to one core with OpenCV on one thread. The rows it writes to time the
read live in a transaction that is rolled back.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import transaction

from catalog import geometry, search
from catalog.models import ImageKeypoints, Merchant, Product, ProductImage
from catalog.search import FineRow, ProductCard

WARMUP = 3


class _Rollback(Exception):
    pass


class Command(BaseCommand):
    help = "Measure geometric verification: bytes per image, extraction time, verify-stage latency for N candidates."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--products", type=int, default=200, help="catalog size (validation split)")
        parser.add_argument("--queries", type=int, default=60)
        parser.add_argument("--candidates", type=int, default=20, help="N: candidates the verify stage checks")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "verify.json")

    def handle(self, *args, products: int, queries: int, candidates: int, seed: int, out: Path, **options) -> None:
        from workers.ml.datasets.shop_benchmark import benchmark_catalog, benchmark_queries

        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as one web request gets
        catalog = benchmark_catalog(size=products, split="validation", seed=seed)
        shots = benchmark_queries(catalog, count=queries, seed=seed, strength="heldout")
        self.stdout.write(f"{len(catalog)} catalog products, {len(shots)} held-out shopper photos, N = {candidates}")

        started = time.perf_counter()
        packed = [geometry.pack(geometry.extract(product.photo)) for product in catalog]
        catalog_ms = (time.perf_counter() - started) * 1000 / len(catalog)
        sizes = np.array([len(blob) for blob in packed])
        query_ms, queries_packed = [], []
        for shot in shots:
            started = time.perf_counter()
            queries_packed.append(geometry.pack(geometry.extract(shot.photo)))
            query_ms.append((time.perf_counter() - started) * 1000)

        rng = np.random.default_rng(seed)
        stage_ms: list[float] = []
        match_ms: list[float] = []
        true_inliers: list[int] = []
        other_inliers: list[int] = []
        try:
            with transaction.atomic():
                image_ids = _store(packed)
                for index, (shot, query) in enumerate(zip(shots, queries_packed)):
                    others = rng.choice([i for i in range(len(catalog)) if i != shot.product_index], candidates - 1)
                    chosen = [shot.product_index, *others.tolist()]
                    rows = [_row(image_ids[i], rank) for rank, i in enumerate(chosen)]
                    started = time.perf_counter()
                    ranked = search.verify_rank(rows=rows, keypoints=query, count=candidates)
                    elapsed = (time.perf_counter() - started) * 1000
                    features = [geometry.unpack(packed[i]) for i in chosen]
                    unpacked_query = geometry.unpack(query)
                    started = time.perf_counter()
                    geometry.verify_many(unpacked_query, features)
                    matched = (time.perf_counter() - started) * 1000
                    if index >= WARMUP:
                        stage_ms.append(elapsed)
                        match_ms.append(matched)
                    by_image = {row.image_id: row.verification for row in ranked}
                    for rank, i in enumerate(chosen):
                        verification = by_image[image_ids[i]]
                        inliers = verification.inliers if verification is not None else 0
                        (true_inliers if rank == 0 else other_inliers).append(inliers)
                raise _Rollback
        except _Rollback:
            pass

        report: dict[str, Any] = {
            "candidates": candidates,
            "catalog_products": len(catalog),
            "queries": len(shots),
            "bytes_per_image": {"mean": float(sizes.mean()), "max": int(sizes.max())},
            "max_features": geometry.MAX_FEATURES,
            "extract_ms": {"catalog_image_mean": catalog_ms, "query_p50": float(np.percentile(query_ms, 50))},
            "verify_stage_ms": _summary(stage_ms),
            "match_only_ms": _summary(match_ms),
            "inliers": {
                "photographed_product_median": float(np.median(true_inliers)),
                "other_products_p99": float(np.percentile(other_inliers, 99)),
            },
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        self.stdout.write(
            f"stored: {report['bytes_per_image']['mean']:,.0f} bytes/image on average "
            f"(max {report['bytes_per_image']['max']:,}: {geometry.MAX_FEATURES} features x 132 + 10)\n"
            f"extract: {catalog_ms:.1f} ms per catalog image, {report['extract_ms']['query_p50']:.1f} ms per query "
            "(p50; both in the worker)\n"
            f"verify stage, N = {candidates}, one core: p50 {report['verify_stage_ms']['p50']:.1f} ms, "
            f"p95 {report['verify_stage_ms']['p95']:.1f} ms, max {report['verify_stage_ms']['max']:.1f} ms "
            f"(of which matching + RANSAC p50 {report['match_only_ms']['p50']:.1f} ms)\n"
            f"inliers: photographed product median {report['inliers']['photographed_product_median']:.0f}, "
            f"other products p99 {report['inliers']['other_products_p99']:.0f}\n"
            f"-> {out}"
        )


def _store(packed: list[bytes]) -> list[int]:
    merchant = Merchant.objects.create(name="bench_verify", slug=f"bench-verify-{os.getpid()}")
    product = Product.objects.create(merchant=merchant, sku="BENCH", title="bench_verify")
    images = ProductImage.objects.bulk_create(
        [
            ProductImage(
                product=product,
                file=f"bench/{i}.png",  # no file: the rows only carry keypoints, and are rolled back
                width=1,  # set, so that the ImageField does not open the (missing) file for its dimensions
                height=1,
                sha256=hashlib.sha256(f"{i}".encode()).hexdigest(),
            )
            for i in range(len(packed))
        ]
    )
    ImageKeypoints.objects.bulk_create(
        [
            ImageKeypoints(image=image, data=blob, features=geometry.unpack(blob).xy.shape[0])
            for image, blob in zip(images, packed)
        ]  # fmt: skip
    )
    return [image.pk for image in images]


def _row(image_id: int, rank: int) -> FineRow:
    card = ProductCard(pk=rank, merchant_id=0, merchant_slug="", sku="", title="", category="", attributes=[],
                       price=None, url="")  # fmt: skip
    return FineRow(product=card, embedding_id=rank, image_id=image_id, image_file="", hamming=0,
                   fc7_distance=1.0 + rank * 0.01, score=1.0 + rank * 0.01, landmarks=[])  # fmt: skip


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "mean": float(np.mean(values)),
        "max": float(np.max(values)),
    }
