"""`manage.py bench_retrieval`: does a shopper's photo find the product? The honest retrieval benchmark.

For each seed and catalog size, in a throwaway database on the same server (never the shop's):
1. a catalog the way a shop uploads it (`workers.ml.datasets.shop_benchmark`: rendered products in colour and
   real Fashion-MNIST photos on white; on the `test` split also the real-photo set) is written through the
   services (`product_upsert`, `image_add`: validation, storage, everything a merchant's upload goes through);
2. the model version is fitted (version 0, by the worker pipeline, on a random sample of that catalog) or a given
   checkpoint is registered, and every image is embedded by the worker pipeline (`workers.pipelines`);
3. held-out shopper photos (`workers.ml.heldout_queries`: code and distortions training never sees) are sent
   through what a search request runs: `intake.image_validate`, the worker's `query_encode`, the payload round
   trip, and `catalog.search.search_encoding` (coarse Hamming, fine fc7 rerank, every re-rank, as served).

Reported per query strength and per source (rendered, fashion-mnist, real), mean and spread over seeds: R@1,
R@10, MRR, the coarse stage's recall (was the product among its candidates) and the share of the catalog it
passed on, the category prediction's accuracy (what a category gate would let through), and per-stage latency
medians. Writes JSON and a markdown table. Recipes are chosen on `--split validation`; report `--split test`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from tqdm import tqdm

from catalog.hamming.memory import _copy_version_rows
from catalog.management.bench_database import (
    INNER_FLAG,
    INNER_HELP,
    options_argv,
    refuse_outside_bench_database,
    run_inside_bench_database,
)
from catalog.search import CATEGORY_MODES, DEFAULT_CATEGORY_MODE

BENCH_DATABASE = "shop_search_bench_retrieval"
BENCH_REDIS_DB = 12  # tasks the services queue on commit land here, where no worker listens, and are purged
QUERY_JPEG_QUALITY = 90  # what a phone uploads
WRITE_BATCH = 200  # products per transaction while loading
EMBED_BATCH = 64  # images per call of the embed pipeline, as the workers batch them
TOP_K = 10
# Candidate counts (the coarse stage's min_count, in whole Hamming shells) at which the coarse curve ranks each query
# again: the fine stage's exact fc7 ranking over those candidates against the exact fc7 ranking over the whole shop.
COARSE_CURVE = (25, 50, 75, 100, 150, 200, 250, 300, 400, 450, 475, 500, 750, 1000, 1500, 2000)


class Command(BaseCommand):
    help = "Retrieval quality on held-out shopper photos and real second photographs, through the real search path."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--sizes", default="1000,10000", help="comma-separated catalog sizes")
        parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (catalog and queries)")
        parser.add_argument("--queries", type=int, default=300, help="held-out shopper photos per strength and seed")
        parser.add_argument("--strengths", default="heldout,heldout-mild", help="held-out query strengths")
        parser.add_argument("--split", default="test", choices=("validation", "test"))
        parser.add_argument("--checkpoint", type=Path, default=None, help="a trained model instead of version 0")
        parser.add_argument(
            "--baseline",
            default="{}",
            help='version 0 recipe to compare, as JSON fit_baseline arguments, e.g. \'{"input_size": 112, '
            '"pooling": "gap", "code_bits": 64}\' (the defaults otherwise)',
        )
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "retrieval.json")
        parser.add_argument(
            "--category-mode",
            default=DEFAULT_CATEGORY_MODE,
            choices=CATEGORY_MODES,
            help=f"what the predicted category does (default: the API's, {DEFAULT_CATEGORY_MODE})",
        )
        parser.add_argument(
            "--variants",
            default="{}",
            help="other search recipes measured on the same catalog and photos, as JSON name -> SearchOptions fields "
            '(and "flip": true for the query-side mirror average; "item_fusion": w re-encodes the photo with its best '
            'item box), e.g. \'{"qe3": {"expansion": 3}}\'',
        )
        parser.add_argument(
            "--catalog-side",
            type=int,
            default=None,
            help="the longer side catalog keypoints are extracted at (default: geometry.CATALOG_SIDE, as ingest does)",
        )
        parser.add_argument(
            "--redis-db", type=int, default=BENCH_REDIS_DB, help="Redis database the bench's queued tasks land in"
        )
        parser.add_argument(
            "--database-suffix", default="", help="run beside another bench_retrieval: its own throwaway database"
        )
        parser.add_argument("--keep-database", action="store_true", help="leave the bench database for inspection")
        parser.add_argument(INNER_FLAG, action="store_true", help=INNER_HELP)

    def handle(self, *args, **options) -> None:
        if options["inside_bench_database"]:
            self._benchmark(**options)
            return
        argv = options_argv(
            options,
            ("sizes", "seeds", "queries", "strengths", "split", "out", "baseline", "category_mode", "variants",
             "database_suffix"),
        )  # fmt: skip
        if options["checkpoint"]:
            argv += ["--checkpoint", str(options["checkpoint"].resolve())]
        if options["catalog_side"]:
            argv += ["--catalog-side", str(options["catalog_side"])]
        run_inside_bench_database(
            command="bench_retrieval", database=BENCH_DATABASE + options["database_suffix"], argv=argv,
            redis_db=options["redis_db"],
            keep=options["keep_database"],
        )  # fmt: skip

    # -- inside the bench database ----------------------------------------------------------------------------------
    def _benchmark(self, *, sizes: str, seeds: str, queries: int, strengths: str, split: str, out: Path,
                   checkpoint: Path | None, baseline: str, category_mode: str, variants: str,
                   database_suffix: str = "", catalog_side: int | None = None, **_) -> None:  # fmt: skip
        from celery import current_app

        from catalog import geometry, search
        from workers.ml.datasets.real_photos import background_photos

        if catalog_side:  # this process embeds the catalog (pipelines.keypoints_store reads it at each call)
            geometry.CATALOG_SIDE = catalog_side
        refuse_outside_bench_database(BENCH_DATABASE + database_suffix)
        call_command("migrate", interactive=False, verbosity=0)
        try:
            backgrounds = background_photos()
        except Exception as exc:  # no opencv-doc: the generator falls back to its procedural surfaces
            self.stderr.write(self.style.WARNING(f"no real background photos ({exc}); procedural surfaces only"))
            backgrounds = []
        runs = []
        for size in (int(s) for s in sizes.split(",")):
            for seed in (int(s) for s in seeds.split(",")):
                started = time.perf_counter()
                run = self._one_catalog(
                    size=size, seed=seed, split=split, queries=queries, strengths=strengths.split(","),
                    checkpoint=checkpoint, baseline=json.loads(baseline), backgrounds=backgrounds,
                    options=search.SearchOptions(k=TOP_K, category_mode=category_mode),
                    variants=json.loads(variants),
                )  # fmt: skip
                run["seconds"] = round(time.perf_counter() - started, 1)
                runs.append(run)
                self.stdout.write(json.dumps({k: v for k, v in run.items() if k != "queries"}))
        current_app.control.purge()
        report = {
            "config": {
                "split": split, "sizes": sizes, "seeds": seeds, "queries": queries, "strengths": strengths,
                "model": str(checkpoint) if checkpoint else f"version 0 {baseline}", "cpus": os.cpu_count(),
                "category_mode": category_mode, "variants": json.loads(variants),
                "catalog_side": geometry.CATALOG_SIDE, "item_fusion": search.item_fusion_weight(search.SearchOptions()),
            },
            "results": summarise(runs),
            "coarse_curve": curve_summary(runs),
            "runs": runs,
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
        table = markdown_table(report) + "\n" + curve_table(report)
        out.with_suffix(".md").write_text(table)
        self.stdout.write(table)
        self.stdout.write(f"written: {out} and {out.with_suffix('.md')}")

    def _one_catalog(self, *, size: int, seed: int, split: str, queries: int, strengths: list[str],
                     checkpoint: Path | None, baseline: dict[str, Any], backgrounds: list,
                     options: Any, variants: dict[str, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
        from catalog.models import ImageEmbedding, Merchant, ModelVersion, ProductImage
        from catalog.services import model_versions
        from catalog.services.products import image_add, product_upsert
        from workers import pipelines
        from workers.ml.datasets.shop_benchmark import benchmark_catalog, benchmark_queries, real_products

        _reset_catalog()
        catalog = benchmark_catalog(size=size, split=split, seed=seed)
        real_queries: list = []
        if split == "test":
            try:
                extra, real_queries = real_products()
                catalog = catalog + extra
            except Exception as exc:
                self.stderr.write(self.style.WARNING(f"no real-photo set ({exc})"))
        # The real-photo set is a shop of its own: its scene-like photos (a street, a town from the air) must not sit
        # in the shop the synthetic queries search, where they outrank clothes for any photo with a busy background.
        # Its queries search both shops, so the real photographs compete with the whole catalog.
        merchant = Merchant.objects.create(slug="bench", name="Bench")
        real_merchant = Merchant.objects.create(slug="real-photos", name="Real photos")
        product_ids = []
        for start in tqdm(range(0, len(catalog), WRITE_BATCH), desc=f"catalog {size} seed {seed}", unit="batch"):
            with transaction.atomic():
                for item in catalog[start : start + WRITE_BATCH]:
                    product = product_upsert(
                        merchant=real_merchant if item.source == "real" else merchant, sku=item.sku,
                        title=item.title[:300], category=item.category,
                        attributes=list(item.attributes),
                    ).product  # fmt: skip
                    image_add(product=product, data=_png(item.photo), position=0)
                    product_ids.append(product.pk)
        started = time.perf_counter()
        if checkpoint is None:
            with transaction.atomic():
                version = model_versions.model_version_bootstrap(
                    code_bits=int(baseline.get("code_bits", 256)), fc7_dim=int(baseline.get("fc7_dim", 256))
                )
                version.config = {"baseline": {k: v for k, v in baseline.items() if k not in ("code_bits", "fc7_dim")}}
                version.save(update_fields=["config"])
            version = pipelines.model_version_fit_baseline(version_id=version.pk)
        else:
            version = _register_checkpoint(checkpoint)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        image_ids = list(ProductImage.objects.order_by("id").values_list("id", flat=True))
        for start in tqdm(range(0, len(image_ids), EMBED_BATCH), desc="embedding", unit="batch"):
            pipelines.images_embed(image_ids=image_ids[start : start + EMBED_BATCH])
        embed_s = time.perf_counter() - started
        if not model_versions.model_version_finish_indexing(version=version):
            raise CommandError("the catalog did not finish indexing")
        version = ModelVersion.objects.get(pk=version.pk)
        product_of = dict(ImageEmbedding.objects.filter(model_version=version).values_list("id", "product_id"))
        table = _copy_version_rows(version_id=version.pk, code_bits=version.code_bits, fc7_dim=version.fc7_dim)
        measured: list[dict[str, Any]] = []
        in_the_shop = dataclasses.replace(
            options, product_filter=dataclasses.replace(options.product_filter, merchant_id=merchant.pk)
        )
        for strength in strengths:
            photos = benchmark_queries(catalog, count=queries, seed=seed, strength=strength, backgrounds=backgrounds)
            for query in tqdm(photos, desc=f"queries {strength}", unit="query"):
                measured.append(
                    _search(query.photo, product_ids[query.product_index], catalog[query.product_index].category,
                            version=version, product_of=product_of, options=in_the_shop, variants=variants,
                            table=table)
                    | {"strength": strength, "source": query.source}
                )  # fmt: skip
        real_index = len(catalog) - len(real_queries)
        for offset, photo in enumerate(real_queries):
            measured.append(
                _search(
                    photo,
                    product_ids[real_index + offset],
                    "real",
                    version=version,
                    product_of=product_of,
                    options=options,
                    variants=variants,
                    table=table,
                )  # fmt: skip
                | {"strength": "real photo", "source": "real", "name": catalog[real_index + offset].sku}
            )
        return {
            "size": size, "seed": seed, "products": len(catalog), "code_bits": version.code_bits,
            "fc7_dim": version.fc7_dim, "fit_s": round(fit_s, 1), "embed_s": round(embed_s, 1), "queries": measured,
        }  # fmt: skip


def _search(photo, product_id: int, category: str, *, version, product_of: dict[int, int], options,
            variants: dict[str, dict[str, Any]], table) -> dict[str, Any]:  # fmt: skip
    """One query through what `POST /api/search` runs, with the true product's rank and each stage's time; and the
    rank each variant recipe gives it (SearchOptions fields, "flip": the photo encoded again with its mirror)."""
    from catalog import query_payload, search
    from catalog.intake.images import image_validate
    from workers import pipelines

    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=QUERY_JPEG_QUALITY)
    started = time.perf_counter()
    validated = image_validate(buffer.getvalue())
    intake_ms = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    message = pipelines.query_encode(
        photo_message=query_payload.photo_to_message(validated.data),
        version_id=version.pk,
        keypoints=search.verify_enabled(options),  # what search_photo asks the worker for
        item_weight=search.item_fusion_weight(options),
    )
    encoding = query_payload.encoding_from_message(message)
    encode_ms = (time.perf_counter() - started) * 1000
    result = search.search_encoding(encoding=encoding, version=version, options=options)
    candidates = {product_of.get(int(i)) for i in result.candidate_ids}
    # The same query without the verify re-rank: what that stage adds.
    unverified = search.search_encoding(
        encoding=encoding, version=version, options=dataclasses.replace(options, verify=False)
    )
    variant_ranks = {}
    for name, recipe in variants.items():
        fields = {key: value for key, value in recipe.items() if key != "flip"}
        variant_options = dataclasses.replace(options, **fields)
        variant_encoding = encoding
        if recipe.get("flip") or "item_fusion" in recipe:  # recipes of the encoder: the photo is encoded again
            variant_encoding = query_payload.encoding_from_message(
                pipelines.query_encode(
                    photo_message=query_payload.photo_to_message(validated.data),
                    version_id=version.pk,
                    keypoints=search.verify_enabled(options),
                    flip=bool(recipe.get("flip")),
                    item_weight=search.item_fusion_weight(variant_options),
                )  # fmt: skip
            )
        variant_ranks[name] = _rank(
            search.search_encoding(encoding=variant_encoding, version=version, options=variant_options), product_id
        )
    return {
        "coarse_curve": coarse_curve(
            table=table,
            code=encoding.code,
            fc7=encoding.fc7,
            product_id=product_id,
            merchant_id=options.product_filter.merchant_id,
        ),  # fmt: skip
        "variants": variant_ranks,
        "rank": _rank(result, product_id),
        "rank_before_verify": _rank(unverified, product_id),
        "coarse_hit": product_id in candidates,
        "candidates": len(result.candidate_ids),
        "category_correct": bool(encoding.category) and encoding.category == category,
        "ms": {"intake": intake_ms, "encode": encode_ms, **result.timings_ms},
    }


def coarse_curve(*, table, code: np.ndarray, fc7: np.ndarray, product_id: int, merchant_id: int | None) -> dict:
    """What the coarse stage costs this query at each depth of COARSE_CURVE: the true product's rank by exact fc7
    over the whole shop ("exact"), and per depth [candidates taken (whole shells, as `shell_cut` takes them), the
    true product's fc7 rank among them (None: not there or past TOP_K), how many of the exact search's first TOP_K
    products are among them]. Ranks are per product (its best image), before the verify re-rank."""
    from catalog.hamming.candidates import CandidateDepth, shell_cut
    from catalog.search import COARSE_MAX_CANDIDATES

    rows = (
        np.flatnonzero(table.merchant_ids == merchant_id)
        if merchant_id is not None
        else np.arange(len(table.embedding_ids))
    )
    hamming = np.unpackbits(np.bitwise_xor(table.codes[rows], np.asarray(code, np.uint8)), axis=1).sum(axis=1)
    distances = np.linalg.norm(table.fc7[rows] - np.asarray(fc7, np.float32).ravel(), axis=1)
    products = table.product_ids[rows]

    def ranked(subset: np.ndarray) -> np.ndarray:  # products nearest first, each at its best image
        order = subset[np.argsort(distances[subset], kind="stable")]
        _, first = np.unique(products[order], return_index=True)
        return products[order[np.sort(first)]]

    def rank_of(ranking: np.ndarray) -> int | None:
        found = np.flatnonzero(ranking[:TOP_K] == product_id)
        return int(found[0]) + 1 if len(found) else None

    exact = ranked(np.arange(len(rows)))
    exact_top = set(exact[:TOP_K].tolist())
    by_hamming = np.argsort(hamming, kind="stable")
    curve = {}
    for minimum in COARSE_CURVE:
        depth = CandidateDepth(min_count=minimum, max_count=max(minimum, COARSE_MAX_CANDIDATES))
        taken = shell_cut(sorted_distances=hamming[by_hamming], depth=depth, complete=True)
        ranking = ranked(by_hamming[:taken])
        curve[str(minimum)] = [taken, rank_of(ranking), len(exact_top & set(ranking[:TOP_K].tolist()))]
    return {"exact": rank_of(exact), "curve": curve}


def _rank(result, product_id: int) -> int | None:
    ranked = [hit.product.pk for hit in result.hits]
    return ranked.index(product_id) + 1 if product_id in ranked else None


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (size, strength, source): each metric's mean and spread (population std) over the seeds."""
    per_seed: dict[tuple, dict[int, dict[str, float]]] = defaultdict(dict)
    for run in runs:
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for query in run["queries"]:
            groups[(run["size"], query["strength"], query["source"])].append(query)
        for key, queries in groups.items():
            ranks = [q["rank"] for q in queries]
            per_seed[key][run["seed"]] = {
                "R@1": float(np.mean([r == 1 for r in ranks])),
                "R@1_before_verify": float(np.mean([q["rank_before_verify"] == 1 for q in queries])),
                "R@10": float(np.mean([r is not None and r <= TOP_K for r in ranks])),
                "MRR@10": float(np.mean([1.0 / r if r else 0.0 for r in ranks])),
                "coarse_recall": float(np.mean([q["coarse_hit"] for q in queries])),
                "coarse_share": float(np.mean([q["candidates"] for q in queries]) / run["products"]),
                "category_accuracy": float(np.mean([q["category_correct"] for q in queries])),
                **{
                    f"{stage}_ms_p50": float(np.median([q["ms"][stage] for q in queries])) for stage in queries[0]["ms"]
                },  # fmt: skip
                **{
                    f"{metric} {name}": value
                    for name in queries[0]["variants"]
                    for metric, value in _recall([q["variants"][name] for q in queries]).items()
                },
                "queries": len(queries),
            }
    summary = []
    for (size, strength, source), seeds in sorted(per_seed.items()):
        metrics = {}
        for name in next(iter(seeds.values())):
            values = [seed[name] for seed in seeds.values()]
            metrics[name] = {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4)}
        summary.append({"size": size, "strength": strength, "source": source, "seeds": len(seeds), **metrics})
    return summary


def curve_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The coarse curve per (size, strength), the shop's synthetic queries of both sources pooled, mean and spread
    over seeds: at each depth the share of the shop passed on, R@1 and R@10 of the fine stage over those candidates
    (before verify), their ratio to the exact fc7 search's, and the share of the exact search's first TOP_K kept."""
    per_seed: dict[tuple, dict[int, dict[str, float]]] = defaultdict(dict)
    for run in runs:
        groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for query in run["queries"]:
            if query["source"] != "real":
                groups[(run["size"], query["strength"])].append(query["coarse_curve"])
                groups[(run["size"], "all")].append(query["coarse_curve"])
        for key, curves in groups.items():
            exact = [c["exact"] for c in curves]
            exact_r1 = float(np.mean([r == 1 for r in exact]))
            exact_r10 = float(np.mean([r is not None for r in exact]))
            metrics = {"exact R@1": exact_r1, "exact R@10": exact_r10}
            for minimum in COARSE_CURVE:
                points = [c["curve"][str(minimum)] for c in curves]
                r1 = float(np.mean([p[1] == 1 for p in points]))
                r10 = float(np.mean([p[1] is not None for p in points]))
                metrics |= {
                    f"{minimum} share": float(np.mean([p[0] for p in points])) / run["size"],
                    f"{minimum} R@1": r1,
                    f"{minimum} R@10": r10,
                    f"{minimum} R@1 ratio": r1 / exact_r1 if exact_r1 else 1.0,
                    f"{minimum} R@10 ratio": r10 / exact_r10 if exact_r10 else 1.0,
                    f"{minimum} top{TOP_K} kept": float(np.mean([p[2] for p in points])) / TOP_K,
                }
            per_seed[key][run["seed"]] = metrics
    summary = []
    for (size, strength), seeds in sorted(per_seed.items()):
        summarised: dict[str, dict[str, float]] = {}
        for name in next(iter(seeds.values())):
            values = [seed[name] for seed in seeds.values()]
            summarised[name] = {"mean": round(statistics.fmean(values), 4), "std": round(statistics.pstdev(values), 4)}
        summary.append({"size": size, "strength": strength, "seeds": len(seeds), **summarised})
    return summary


def curve_table(report: dict[str, Any]) -> str:
    lines = [
        "Coarse curve (the shop's held-out photos; fine stage before verify; mean ± spread over seeds): candidates "
        "passed as a share of the shop, R@10 and R@1 over them as a ratio of the exact fc7 search's, and the share "
        f"of the exact search's first {TOP_K} kept.",
        "",
        "| products | queries | exact R@1 / R@10 | min candidates | passes | R@10 ratio | R@1 ratio | top-10 kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report.get("coarse_curve", []):
        exact = f"{row['exact R@1']['mean']:.3f} / {row['exact R@10']['mean']:.3f}"
        for minimum in COARSE_CURVE:
            if row[f"{minimum} share"]["mean"] > 0.5:
                continue
            lines.append(
                f"| {row['size']:,} | {row['strength']} | {exact} | {minimum} | {row[f'{minimum} share']['mean']:.1%} "
                f"| {row[f'{minimum} R@10 ratio']['mean']:.3f} ± {row[f'{minimum} R@10 ratio']['std']:.3f} "
                f"| {row[f'{minimum} R@1 ratio']['mean']:.3f} ± {row[f'{minimum} R@1 ratio']['std']:.3f} "
                f"| {row[f'{minimum} top{TOP_K} kept']['mean']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def markdown_table(report: dict[str, Any]) -> str:
    config = report["config"]
    lines = [
        f"Model: {config['model']}; split: {config['split']}; seeds: {config['seeds']}; "
        f"{config['queries']} held-out photos per strength and seed (mean ± spread over seeds); catalog keypoints at "
        f"{config.get('catalog_side', '?')} px, item fusion {config.get('item_fusion', '?')}.",
        "",
        "| products | queries | source | R@1 | R@1 before verify | R@10 | MRR@10 | coarse recall | coarse passes "
        "| category right | encode ms | search ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:

        def cell(name: str, row: dict[str, Any] = row) -> str:
            return f"{row[name]['mean']:.3f} ± {row[name]['std']:.3f}"

        search_ms = row["total_ms_p50"]["mean"]
        lines.append(
            f"| {row['size']:,} | {row['strength']} | {row['source']} | {cell('R@1')} | {cell('R@1_before_verify')} "
            f"| {cell('R@10')} "
            f"| {cell('MRR@10')} | {cell('coarse_recall')} | {row['coarse_share']['mean']:.1%} "
            f"| {row['category_accuracy']['mean']:.2f} | {row['encode_ms_p50']['mean']:.1f} | {search_ms:.1f} |"
        )
    names = list(config.get("variants") or {})
    if names:
        lines += [
            "",
            "Variants on the same catalogs and photos (R@1 / R@10; the first column is the recipe above):",
            "",
            "| products | queries | source | as above | " + " | ".join(names) + " |",
            "|---|---|---|---|" + "---|" * len(names),
        ]
        for row in report["results"]:
            cells = [f"{row['R@1']['mean']:.3f} / {row['R@10']['mean']:.3f}"] + [
                f"{row[f'R@1 {name}']['mean']:.3f} / {row[f'R@10 {name}']['mean']:.3f}" for name in names
            ]
            lines.append(f"| {row['size']:,} | {row['strength']} | {row['source']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _recall(ranks: list[int | None]) -> dict[str, float]:
    return {
        "R@1": float(np.mean([r == 1 for r in ranks])),
        "R@10": float(np.mean([r is not None and r <= TOP_K for r in ranks])),
    }


def _reset_catalog() -> None:
    """Empty the bench database between catalogs: every catalog row and model version (CASCADE reaches the rest),
    each version's partial code index, and the stored files."""
    from catalog.models import Merchant, ModelVersion

    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE indexname LIKE 'catalog_embedding_code_hnsw_v%%'")
        for (name,) in cursor.fetchall():
            cursor.execute(f'DROP INDEX IF EXISTS "{name}"')
        cursor.execute(f"TRUNCATE {Merchant._meta.db_table}, {ModelVersion._meta.db_table} CASCADE")
    media = Path(settings.MEDIA_ROOT)
    if media.exists():
        shutil.rmtree(media)


def _register_checkpoint(path: Path):
    from catalog.models import ModelVersion
    from catalog.services import model_versions
    from workers.pipelines import encoder_at

    encoder = encoder_at(path)
    version = ModelVersion.objects.create(
        name=path.stem, code_bits=encoder.code_bits, fc7_dim=encoder.fc7_dim, status=ModelVersion.Status.READY
    )
    model_versions.model_version_ready(
        version=version, checkpoint=path, code_bits=encoder.code_bits, fc7_dim=encoder.fc7_dim,
        config=encoder.version_info,
    )  # fmt: skip
    return model_versions.model_version_start_indexing(version=version)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
