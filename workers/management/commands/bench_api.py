"""`manage.py bench_api --url http://127.0.0.1:8033`: POST /api/search latency against a running server, as shoppers
see it, at each concurrency asked for (default 1 and 8).

The photos are the golden set's held-out shopper views of the catalog's own products
(workers.pipelines.golden_query_photos: a cluttered, tilted, relit phone shot of a product, as PNG), posted in a
fixed order by `--concurrency` client threads until `--requests` answers are in (with `--phone-side 4032`, each
enlarged to a 12-MP phone JPEG, so that intake costs what a real upload costs). Reported per concurrency: the
client's latency (p50/p95/p99/max of the answers), the server's own `timings_ms` per stage (p50/p95/p99), how
many were refused (503 and 429, see workers.management.search_load, which bench_speed shares), and answers per
second. JSON (`--out`) and a markdown table (stdout).

`--fields verify=false` adds form fields to every search (here: no geometric re-rank). `--floors`, at concurrency 1,
measures in this process, between two searches and on the same photo, what each stage of that search cannot beat:
the version's network alone on the preprocessed photo, and on its best item box when the search fused one (ONNX
Runtime, one thread: the encode floor), reading as many codes as the server's index holds once (the coarse floor),
and gathering, ranking exactly and sorting as many fc7 vectors as that search's coarse stage handed on, from an
array as large as the index's (the fine floor); the report puts the server's total next to the sum of those floors
plus the server's own intake (ratio of medians).

Needs the server's database (run this with the server's settings: same SHOP_SEARCH_VAR_DIR or DATABASE_URL), an
active model version, and whatever encodes queries for the server (SEARCH_ENCODER).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from PIL import Image

from catalog import selectors
from inference.localise import ItemBox, crop_to
from inference.preprocess import preprocess_batch
from workers.management.search_load import search_load, warm_up


class Command(BaseCommand):
    help = "Measure POST /api/search latency (client and server stages) at several concurrencies."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000")
        parser.add_argument("--requests", type=int, default=200, help="answers measured per concurrency")
        parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
        parser.add_argument("--photos", type=int, default=50, help="distinct shopper photos, cycled")
        parser.add_argument(
            "--phone-side", type=int, default=0, help="send each photo as a JPEG of this longer side (e.g. 4032)"
        )
        parser.add_argument("--label", default="", help="names the run in the output (e.g. before, after)")
        parser.add_argument("--fields", nargs="*", default=[], help="extra form fields, e.g. verify=false")
        parser.add_argument(
            "--floors", action="store_true", help="at concurrency 1, each stage's floor between two searches"
        )
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "api.json")

    def handle(self, *args, url: str, requests: int, concurrency: list[int], photos: int, phone_side: int,
               label: str, out: Path, fields: list[str], floors: bool, **options) -> None:  # fmt: skip
        from workers.pipelines import golden_query_photos

        version = selectors.model_version_active()
        if version is None:
            raise CommandError("no active model version: run `manage.py demo` (or demo_catalog) first")
        shots = [photo for _, _, _, photo in golden_query_photos(version=version)[:photos]]
        if not shots:
            raise CommandError("the catalog has no usable images to photograph")
        if phone_side:
            shots = [_phone_jpeg(shot, phone_side) for shot in shots]
        endpoint = url.rstrip("/") + "/api/search"
        report: dict = {
            "label": label,
            "url": endpoint,
            "model_version": version.name,
            "photos": len(shots),
            "photo_bytes_median": int(np.median([len(shot) for shot in shots])),
            "runs": [],
        }
        form = dict(field.split("=", 1) for field in fields)
        report["fields"] = form
        floor = StageFloors(version=version, photos=shots) if floors else None
        warm_up(endpoint, shots, form)
        for clients in concurrency:
            measured = floor if floor is not None and clients == 1 else None
            run = search_load(
                endpoint, shots, clients=clients, answers=requests, fields=form,
                after=None if measured is None else measured.measure,
            )  # fmt: skip
            if measured is not None:
                run["floors"] = measured.report(run["server_ms"])
                self.stdout.write(f"floors: {json.dumps(run['floors'])}")
            report["runs"].append(run)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        self.stdout.write(markdown(report))
        self.stdout.write(f"\nJSON: {out}")


class StageFloors:
    """Each stage's floor for the searches of a concurrency-1 run, measured in this process between two searches on
    the same photo (module docstring). Wall time, as the server's timings_ms."""

    def __init__(self, *, version, photos: list[bytes]) -> None:
        from django.db import connection

        from catalog import query_encoder
        from catalog.codes import version_sql
        from catalog.intake.images import image_query

        encoder = query_encoder.encoder_for(version)
        if encoder is None:
            raise CommandError(f"{version} has no usable ONNX export: no encode floor")
        self.network = encoder.network
        self.preprocessing = encoder.preprocessing
        self.images = [image_query(photo, box=None, max_side=query_encoder.QUERY_MAX_SIDE) for photo in photos]
        self.batches = [preprocess_batch([image], encoder.preprocessing)[0] for image in self.images]
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id "
                f"WHERE {version_sql('e', version.pk)} AND p.active"
            )
            self.rows = int(cursor.fetchone()[0])
        rng = np.random.default_rng(0)
        code_words = max(1, self.rows * ((version.code_bits + 7) // 8) // 8)
        self.codes = rng.integers(0, np.iinfo(np.int64).max, code_words, dtype=np.int64).view(np.uint64)
        self.fc7 = rng.standard_normal((self.rows, version.fc7_dim), dtype=np.float32)
        self.query = rng.standard_normal(version.fc7_dim, dtype=np.float32)
        self.rng = rng
        self.times: dict[str, list[float]] = {"encode": [], "coarse": [], "fine": []}

    def measure(self, index: int, answer: dict) -> None:
        encode = _timed(lambda: self.network(self.batches[index]))
        query = answer.get("query") or {}
        if query.get("item_fused") and query.get("item_boxes"):  # the network ran on the photo's best box too
            x0, y0, x1, y1 = query["item_boxes"][0]["box"]
            box = ItemBox(x0, y0, x1, y1, score=1.0)
            crop = preprocess_batch([crop_to(self.images[index], box)], self.preprocessing)[0]
            encode += _timed(lambda: self.network(crop))
        self.times["encode"].append(encode)
        self.times["coarse"].append(
            min(_timed(lambda: self.codes.sum()), _timed(lambda: np.bitwise_or.reduce(self.codes)))
        )
        rows = self.rng.integers(0, self.rows, int(answer.get("coarse", {}).get("candidates", 0)))
        self.times["fine"].append(_timed(lambda: self._rank(rows)))

    def _rank(self, rows: np.ndarray) -> None:
        difference = self.fc7[rows] - self.query
        np.argsort(np.einsum("ij,ij->i", difference, difference))

    def report(self, server_ms: dict) -> dict:
        floors = {stage: round(float(np.median(values)), 3) for stage, values in self.times.items()}
        intake = server_ms.get("intake", {}).get("p50", 0.0)
        budget = intake + sum(floors.values())
        total = server_ms.get("total", {}).get("p50", 0.0)
        return {
            "index_rows": self.rows,
            "floor_ms_p50": floors,
            "stage_over_floor_p50": {
                stage: round(server_ms[stage]["p50"] / floors[stage], 2)
                for stage in floors
                if stage in server_ms and floors[stage] > 0
            },
            "intake_ms_p50": intake,
            "floors_plus_intake_ms": round(budget, 3),
            "total_over_floors_plus_intake": round(total / budget, 2) if budget else None,
        }


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def _phone_jpeg(photo: bytes, side: int) -> bytes:
    """The shopper photo enlarged to a phone camera's size (longer side `side`) as the JPEG a phone uploads: what
    intake costs on a real upload rather than on a small PNG."""
    picture = Image.open(io.BytesIO(photo)).convert("RGB")
    scale = side / max(picture.size)
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def markdown(report: dict) -> str:
    lines = [
        f"POST /api/search, {report['label'] or 'run'}: version {report['model_version']}, {report['photos']} "
        f"shopper photos (median {report['photo_bytes_median']:,} bytes)"
        + (f", form {report['fields']}" if report.get("fields") else ""),
        "",
        "| concurrency | answers/s | refused (503/429) | client p50 | p95 | p99 | p99/p50 | server total p50 | p99 |"
        " encode p50 | p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        client, server = run["client_ms"], run["server_ms"]
        total, encode = server.get("total", {}), server.get("encode", {})
        refused = f"{run['statuses'].get('503', 0)}/{run['statuses'].get('429', 0)}"
        lines.append(
            f"| {run['concurrency']} | {run['answers_per_s']} | {refused} | {client['p50']} | {client['p95']} | "
            f"{client['p99']} | {run['p99_over_p50']} | {total.get('p50', '')} | {total.get('p99', '')} | "
            f"{encode.get('p50', '')} | {encode.get('p99', '')} |"
        )
    for run in report["runs"]:
        floors = run.get("floors")
        if floors:
            lines += [
                "",
                f"Concurrency {run['concurrency']}, floors measured between the searches ({floors['index_rows']:,} "
                f"codes in the index), p50 ms: "
                + ", ".join(f"{stage} {ms}" for stage, ms in floors["floor_ms_p50"].items())
                + f"; intake {floors['intake_ms_p50']}; floors + intake {floors['floors_plus_intake_ms']}; server "
                f"total / (floors + intake) = **{floors['total_over_floors_plus_intake']}x**; stage / floor: "
                + ", ".join(f"{stage} {ratio}x" for stage, ratio in floors["stage_over_floor_p50"].items()),
            ]
    lines += ["", "Server stages, p50 / p99 ms:"]
    for run in report["runs"]:
        parts = [f"{stage} {s['p50']} / {s['p99']}" for stage, s in run["server_ms"].items()]
        lines.append(f"- concurrency {run['concurrency']}: " + ", ".join(parts))
    return "\n".join(lines)
