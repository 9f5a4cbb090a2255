"""`manage.py bench_api --url http://127.0.0.1:8033`: POST /api/search latency against a running server, as shoppers
see it, at each concurrency asked for (default 1 and 8).

The photos are the golden set's held-out shopper views of the catalog's own products
(workers.pipelines.golden_query_photos: a cluttered, tilted, relit phone shot of a product, as PNG), posted in a
fixed order by `--concurrency` client threads until `--requests` answers are in (with `--phone-side 4032`, each
enlarged to a 12-MP phone JPEG, so that intake costs what a real upload costs). Reported per concurrency: the
client's latency (p50/p95/p99/max of the answers), the server's own `timings_ms` per stage (p50/p95/p99), how
many were refused (503 and 429, see workers.management.search_load, which bench_speed shares), and answers per
second. JSON (`--out`) and a markdown table (stdout).

Needs the server's database (run this with the server's settings: same SHOP_SEARCH_VAR_DIR or DATABASE_URL), an
active model version, and whatever encodes queries for the server (SEARCH_ENCODER).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from PIL import Image

from catalog import selectors
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
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "api.json")

    def handle(self, *args, url: str, requests: int, concurrency: list[int], photos: int, phone_side: int,
               label: str, out: Path, **options) -> None:  # fmt: skip
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
        warm_up(endpoint, shots)
        for clients in concurrency:
            report["runs"].append(search_load(endpoint, shots, clients=clients, answers=requests))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        self.stdout.write(markdown(report))
        self.stdout.write(f"\nJSON: {out}")


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
        f"shopper photos (median {report['photo_bytes_median']:,} bytes)",
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
    lines += ["", "Server stages, p50 / p99 ms:"]
    for run in report["runs"]:
        parts = [f"{stage} {s['p50']} / {s['p99']}" for stage, s in run["server_ms"].items()]
        lines.append(f"- concurrency {run['concurrency']}: " + ", ".join(parts))
    return "\n".join(lines)
