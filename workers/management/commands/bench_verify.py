"""`manage.py bench_verify`: what geometric verification costs (catalog.geometry, the search's verify stage).

On the held-out benchmark's validation split (catalog photos on white, shopper photos from
workers.ml.heldout_queries): the bytes stored per catalog image, the extraction time per catalog image (ingest, in the
worker) and per query photo (query encode, in the worker), and the verify stage as the web process runs it for N
candidates, end to end: one read of the N candidates' stored keypoints from PostgreSQL, unpacking, matching and
RANSAC (`catalog.search.verify_rank`). Pinned to one core with OpenCV on one thread. The N candidates of a query are
its product and, by default, the N - 1 other products with the most tentative matches (the worst case: RANSAC runs
for nearly all of them), or N - 1 random ones. The rows it writes to time the
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
        parser.add_argument(
            "--catalog-side",
            type=int,
            default=geometry.CATALOG_SIDE,
            help="longer side (px) catalog images' features are extracted at (SIFT's cost follows its area)",
        )
        parser.add_argument(
            "--query-side", type=int, default=geometry.QUERY_SIDE, help="longer side (px) for the shopper photos"
        )
        parser.add_argument(
            "--random-candidates",
            action="store_true",
            help="N-1 random other products instead of the hardest (most tentative matches: the worst case)",
        )
        parser.add_argument(
            "--recall",
            action="store_true",
            help="also R@1/R@10 before and after verification, over GeM features of the packaged backbone at 224 px "
            "(the version-0 recipe of issue 10, PCA to 256 on the catalog) on these queries and the real photo pairs",
        )
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "verify.json")

    def handle(
        self,
        *args,
        products: int,
        queries: int,
        candidates: int,
        seed: int,
        catalog_side: int,
        query_side: int,
        random_candidates: bool,
        recall: bool,
        out: Path,
        **options,
    ) -> None:
        from workers.ml.datasets.shop_benchmark import benchmark_catalog, benchmark_queries

        hardest = not random_candidates

        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, as one web request gets
        catalog = benchmark_catalog(size=products, split="validation", seed=seed)
        shots = benchmark_queries(catalog, count=queries, seed=seed, strength="heldout")
        self.stdout.write(f"{len(catalog)} catalog products, {len(shots)} held-out shopper photos, N = {candidates}")

        started, cpu_started = time.perf_counter(), time.thread_time()
        packed = [geometry.pack(geometry.extract(product.photo, side=catalog_side)) for product in catalog]
        catalog_ms = (time.perf_counter() - started) * 1000 / len(catalog)
        catalog_cpu_ms = (time.thread_time() - cpu_started) * 1000 / len(catalog)
        sizes = np.array([len(blob) for blob in packed])
        query_ms, queries_packed = [], []
        for shot in shots:
            started = time.perf_counter()
            queries_packed.append(geometry.pack(geometry.extract(shot.photo, side=query_side)))
            query_ms.append((time.perf_counter() - started) * 1000)

        rng = np.random.default_rng(seed)
        all_features = [geometry.unpack(blob) for blob in packed]
        stage_ms: list[float] = []
        stage_cpu_ms: list[float] = []  # this thread's CPU time: what the stage costs when other work shares the core
        match_ms: list[float] = []
        true_inliers: list[int] = []
        other_inliers: list[int] = []
        try:
            with transaction.atomic():
                image_ids = _store(packed)
                for index, (shot, query) in enumerate(zip(shots, queries_packed)):
                    others = [i for i in range(len(catalog)) if i != shot.product_index]
                    if hardest:  # the look-alikes with the most tentative matches: RANSAC runs for most of them
                        matches = [v.matches if v else 0 for v in geometry.verify_many(geometry.unpack(query), [
                            all_features[i] for i in others])]  # fmt: skip
                        picked = [others[i] for i in np.argsort(matches)[::-1][: candidates - 1]]
                    else:
                        picked = rng.choice(others, candidates - 1, replace=False).tolist()
                    chosen = [shot.product_index, *picked]
                    rows = [_row(image_ids[i], rank) for rank, i in enumerate(chosen)]
                    started, cpu_started = time.perf_counter(), time.thread_time()
                    ranked = search.verify_rank(rows=rows, keypoints=query, count=candidates)
                    elapsed = (time.perf_counter() - started) * 1000
                    cpu = (time.thread_time() - cpu_started) * 1000
                    features = [geometry.unpack(packed[i]) for i in chosen]
                    unpacked_query = geometry.unpack(query)
                    started = time.perf_counter()
                    geometry.verify_many(unpacked_query, features)
                    matched = (time.perf_counter() - started) * 1000
                    if index >= WARMUP:
                        stage_ms.append(elapsed)
                        stage_cpu_ms.append(cpu)
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
            "candidate_choice": "hardest" if hardest else "random",
            "catalog_products": len(catalog),
            "queries": len(shots),
            "bytes_per_image": {"mean": float(sizes.mean()), "max": int(sizes.max())},
            "max_features": geometry.MAX_FEATURES,
            "catalog_side": catalog_side,
            "query_side": query_side,
            "extract_ms": {
                "catalog_image_mean": catalog_ms,
                "catalog_image_cpu_mean": catalog_cpu_ms,
                "query_p50": float(np.percentile(query_ms, 50)),
            },
            "verify_stage_ms": _summary(stage_ms),
            "verify_stage_cpu_ms": _summary(stage_cpu_ms),
            "match_only_ms": _summary(match_ms),
            "inliers": {
                "photographed_product_median": float(np.median(true_inliers)),
                "other_products_p99": float(np.percentile(other_inliers, 99)),
            },
        }
        if recall:
            report["recall"] = _recall(catalog, shots, packed, queries_packed, candidates, catalog_side, query_side)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        self.stdout.write(
            f"stored: {report['bytes_per_image']['mean']:,.0f} bytes/image on average "
            f"(max {report['bytes_per_image']['max']:,}: {geometry.MAX_FEATURES} features x 132 + 10)\n"
            f"extract: {catalog_ms:.1f} ms per catalog image at {catalog_side} px ({catalog_cpu_ms:.1f} ms of CPU; "
            f"in the embed worker), {report['extract_ms']['query_p50']:.1f} ms per query at {query_side} px (p50)\n"
            f"verify stage, N = {candidates} ({report['candidate_choice']} candidates), one core: "
            f"p50 {report['verify_stage_ms']['p50']:.1f} ms, "
            f"p95 {report['verify_stage_ms']['p95']:.1f} ms, max {report['verify_stage_ms']['max']:.1f} ms "
            f"(of which matching + RANSAC p50 {report['match_only_ms']['p50']:.1f} ms); "
            f"CPU time p50 {report['verify_stage_cpu_ms']['p50']:.1f} ms, "
            f"p95 {report['verify_stage_cpu_ms']['p95']:.1f} ms\n"
            f"inliers: photographed product median {report['inliers']['photographed_product_median']:.0f}, "
            f"other products p99 {report['inliers']['other_products_p99']:.0f}\n"
            f"-> {out}"
        )
        for source, numbers in report.get("recall", {}).items():
            self.stdout.write(
                f"{source:>14} ({numbers['queries']} queries): R@1 {numbers['r1_before']:.3f} -> "
                f"{numbers['r1_after']:.3f}, R@10 {numbers['r10_before']:.3f} -> {numbers['r10_after']:.3f}"
            )


def _recall(
    catalog,
    shots,
    packed: list[bytes],
    queries_packed: list[bytes],
    candidates: int,
    catalog_side: int,
    query_side: int,
) -> dict[str, Any]:
    """R@1/R@10 of a global-descriptor ranking (GeM at 224 px, PCA-256, cosine), then with its top N re-ranked by
    verification exactly as the search fuses it: L2 distance x search.verify_factor(inliers)."""
    import torch
    import torch.nn.functional as F

    from workers.ml.backbone import PACKAGED_BACKBONE, PACKAGED_MEAN, PACKAGED_STD, create_pooled_model
    from workers.ml.datasets.real_photos import real_photo_pairs
    from workers.ml.preprocess import Preprocessing, preprocess_batch

    real = real_photo_pairs()
    catalog_photos = [product.photo for product in catalog] + [photo for _, photo, _ in real]
    query_photos = [shot.photo for shot in shots] + [photo for _, _, photo in real]
    truth = np.array([shot.product_index for shot in shots] + [len(catalog) + i for i in range(len(real))])
    sources = [shot.source for shot in shots] + ["real"] * len(real)
    catalog_features = [geometry.unpack(blob) for blob in packed] + [
        geometry.extract(photo, side=catalog_side) for _, photo, _ in real
    ]
    query_features = [geometry.unpack(blob) for blob in queries_packed] + [
        geometry.extract(photo, side=query_side) for _, _, photo in real
    ]

    model = create_pooled_model(PACKAGED_BACKBONE, packaged_weights=True).eval()
    prep = Preprocessing(224, PACKAGED_MEAN, PACKAGED_STD)

    def gem(photos: list) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for start in range(0, len(photos), 32):
                batch, _ = preprocess_batch(photos[start : start + 32], prep)
                maps = model.forward_features(batch).clamp(min=1e-6)  # type: ignore[operator]  # timm models have it
                out.append(F.normalize(maps.pow(3).mean((2, 3)).pow(1 / 3), dim=1))
        return torch.cat(out).double().numpy()

    catalog_gem, query_gem = gem(catalog_photos), gem(query_photos)
    mean = catalog_gem.mean(0)
    _, _, basis = np.linalg.svd(catalog_gem - mean, full_matrices=False)
    c = (catalog_gem - mean) @ basis[:256].T
    q = (query_gem - mean) @ basis[:256].T
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    distance = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * (q @ c.T)))
    before = np.argsort(distance, axis=1)
    after = before.copy()
    for j in range(len(q)):
        top = before[j, :candidates]
        checked = geometry.verify_many(query_features[j], [catalog_features[i] for i in top])
        fused = [distance[j, i] * search.verify_factor(v.inliers if v else 0) for i, v in zip(top, checked)]
        after[j, :candidates] = top[np.argsort(fused, kind="stable")]
    result = {}
    for source in sorted(set(sources)):
        rows = np.array([s == source for s in sources])
        rank_before = np.argmax(before[rows] == truth[rows, None], axis=1)
        rank_after = np.argmax(after[rows] == truth[rows, None], axis=1)
        result[source] = {
            "queries": int(rows.sum()),
            "r1_before": float((rank_before < 1).mean()),
            "r1_after": float((rank_after < 1).mean()),
            "r10_before": float((rank_before < 10).mean()),
            "r10_after": float((rank_after < 10).mean()),
        }
    return result


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
