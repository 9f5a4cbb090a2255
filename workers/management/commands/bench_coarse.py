"""`manage.py bench_coarse`: how deep the coarse stage must look, on catalogs too big to upload in a benchmark run.

bench_retrieval writes every catalog photo through the merchant's services into a throwaway database; at 10,000
products that alone took ~40 minutes on the 2 shared cores (and its 10k run was killed for memory). The coarse
stage's depth only needs the catalog's codes and fc7 and each query's, so this command computes them without the
database, with everything else as bench_retrieval and the served path do:
- the same catalog and held-out shopper photos (`benchmark_catalog`, `benchmark_queries`, the split's seeds);
- version 0 fitted by `fit_baseline` on a random sample of BASELINE_FIT_SAMPLE catalog photos, as the worker pipeline
  fits it, and loaded by `encoder_at`, as a worker loads it (ONNX Runtime);
- each query as a phone sends it (JPEG at bench_retrieval's quality) through `intake.image_validate`;
- per query, `bench_retrieval.coarse_curve`: whole Hamming shells cut by catalog.hamming's `shell_cut` at each depth
  of COARSE_CURVE, the fine stage's exact fc7 ranking by product over them, against exact fc7 over the whole shop.

Writes JSON and the curve table (`bench_retrieval.curve_table`); choose the depth on `--split validation`.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand
from PIL import Image
from tqdm import tqdm

from workers.management.commands.bench_retrieval import (
    COARSE_CURVE,
    QUERY_JPEG_QUALITY,
    coarse_curve,
    curve_summary,
    curve_table,
)

ENCODE_BATCH = 64


@dataclass(frozen=True)
class _Table:
    """The columns of catalog.hamming.memory's loaded version that coarse_curve reads."""

    embedding_ids: np.ndarray
    product_ids: np.ndarray
    merchant_ids: np.ndarray
    codes: np.ndarray
    fc7: np.ndarray


class Command(BaseCommand):
    help = "Coarse-stage depth against exact fc7 search on held-out shopper photos, without loading a database."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--sizes", default="1000,10000", help="comma-separated catalog sizes")
        parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (catalog and queries)")
        parser.add_argument("--queries", type=int, default=200, help="held-out shopper photos per strength and seed")
        parser.add_argument("--strengths", default="heldout,heldout-mild", help="held-out query strengths")
        parser.add_argument("--split", default="test", choices=("validation", "test"))
        parser.add_argument("--baseline", default="{}", help="version 0 recipe, as JSON fit_baseline arguments")
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "coarse.json")

    def handle(self, *args, sizes: str, seeds: str, queries: int, strengths: str, split: str, baseline: str,
               out: Path, **_) -> None:  # fmt: skip
        from workers.ml.datasets.real_photos import background_photos

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
                    recipe=json.loads(baseline), backgrounds=backgrounds,
                )  # fmt: skip
                run["seconds"] = round(time.perf_counter() - started, 1)
                runs.append(run)
                self.stdout.write(json.dumps({k: v for k, v in run.items() if k != "queries"}))
                self._write(out, runs, split=split, sizes=sizes, seeds=seeds, queries=queries, baseline=baseline)

    def _write(self, out: Path, runs: list, **config) -> None:
        """After every catalog: a long run that is stopped keeps what it measured."""
        report: dict[str, Any] = {
            "config": {**config, "depths": list(COARSE_CURVE), "cpus": os.cpu_count()},
            "coarse_curve": curve_summary(runs),
            "runs": runs,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        report["exact"] = exact_by_source(runs)
        table = curve_table(report) + "\n" + exact_table(report["exact"])
        out.write_text(json.dumps(report, indent=1))
        out.with_suffix(".md").write_text(table)
        self.stdout.write(table)

    def _one_catalog(self, *, size: int, seed: int, split: str, queries: int, strengths: list[str], recipe: dict,
                     backgrounds: list) -> dict:  # fmt: skip
        from catalog.intake.images import image_validate
        from workers.ml.baseline import fit_baseline
        from workers.ml.datasets.shop_benchmark import benchmark_catalog, benchmark_queries
        from workers.pipelines import BASELINE_FIT_SAMPLE, encoder_at

        catalog = benchmark_catalog(size=size, split=split, seed=seed)
        photos = {
            strength: benchmark_queries(catalog, count=queries, seed=seed, strength=strength, backgrounds=backgrounds)
            for strength in strengths
        }
        # The catalog's decoded photos (10,000 x 256 x 256 RGB = 2 GB, and their masks) do not stay in memory past
        # the queries' making: two 10k runs were killed for memory on the shared machine. PNG keeps them exact.
        categories = [item.category for item in catalog]
        stored = [_png(item.photo) for item in catalog]
        del catalog
        sample = np.random.default_rng([seed, size]).choice(len(stored), min(len(stored), BASELINE_FIT_SAMPLE), False)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as directory:
            path = fit_baseline(
                [_decoded(stored[i]) for i in sample], categories=[categories[i] for i in sample],
                out_path=Path(directory) / f"v0-{size}-{seed}.pt", **{"num_threads": 1, **recipe},
            )  # fmt: skip
            fit_s = time.perf_counter() - started
            encoder = encoder_at(path)
            started = time.perf_counter()
            codes, fc7 = [], []
            for start in tqdm(range(0, len(stored), ENCODE_BATCH), desc=f"embedding {size} seed {seed}"):
                encoding = encoder.encode([_decoded(data) for data in stored[start : start + ENCODE_BATCH]])
                codes.append(encoding.codes)
                fc7.append(encoding.fc7)
            embed_s = time.perf_counter() - started
            ids = np.arange(len(stored), dtype=np.int64)
            table = _Table(ids, ids, np.zeros_like(ids), np.concatenate(codes), np.concatenate(fc7))
            measured = []
            for strength, shots in photos.items():
                for query in tqdm(shots, desc=f"queries {strength}"):
                    buffer = io.BytesIO()
                    query.photo.save(buffer, format="JPEG", quality=QUERY_JPEG_QUALITY)
                    photo = Image.open(io.BytesIO(image_validate(buffer.getvalue()).data)).convert("RGB")
                    encoding = encoder.encode([photo])
                    measured.append(
                        {
                            "strength": strength,
                            "source": query.source,
                            "coarse_curve": coarse_curve(
                                table=table,
                                code=encoding.codes[0],
                                fc7=encoding.fc7[0],
                                product_id=query.product_index,
                                merchant_id=None,
                            ),  # fmt: skip
                        }
                    )
        return {
            "size": size, "seed": seed, "products": len(stored), "code_bits": int(table.codes.shape[1] * 8),
            "fc7_dim": int(table.fc7.shape[1]), "fit_s": round(fit_s, 1), "embed_s": round(embed_s, 1),
            "queries": measured,
        }  # fmt: skip


def exact_by_source(runs: list) -> list[dict]:
    """Exact fc7 search over the whole shop (no coarse stage, no verify): R@1 and R@10 per (size, strength, source),
    mean and spread over seeds: what compares one version 0 recipe's fc7 with another's."""
    per_seed: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for query in run["queries"]:
            per_seed[(run["size"], query["strength"], query["source"])][run["seed"]].append(
                query["coarse_curve"]["exact"]
            )
    rows = []
    for (size, strength, source), seeds in sorted(per_seed.items()):
        r1 = [float(np.mean([r == 1 for r in ranks])) for ranks in seeds.values()]
        r10 = [float(np.mean([r is not None for r in ranks])) for ranks in seeds.values()]
        rows.append({
            "size": size, "strength": strength, "source": source, "seeds": len(seeds),
            "queries": sum(len(ranks) for ranks in seeds.values()),
            "R@1": {"mean": round(statistics.fmean(r1), 4), "std": round(statistics.pstdev(r1), 4)},
            "R@10": {"mean": round(statistics.fmean(r10), 4), "std": round(statistics.pstdev(r10), 4)},
        })  # fmt: skip
    return rows


def exact_table(rows: list[dict]) -> str:
    lines = [
        "Exact fc7 search over the whole shop (before the coarse stage and verify), mean ± spread over seeds:",
        "",
        "| products | queries | source | photos | R@1 | R@10 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['size']:,} | {row['strength']} | {row['source']} | {row['queries']} "
            f"| {row['R@1']['mean']:.3f} ± {row['R@1']['std']:.3f} "
            f"| {row['R@10']['mean']:.3f} ± {row['R@10']['std']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
