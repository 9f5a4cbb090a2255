"""`manage.py bench_encode`: what the Celery `search` queue adds to a query, against an in-process encoder.

Encodes the same catalog photos (a) through `encode_query` on the `search` queue, as the web does, and (b) with the
worker's own pipeline run in this process (workers.pipelines.query_encode: torch loaded here, which is exactly what
web processes avoid). Needs an active model version and a running worker (`manage.py demo` starts one).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from catalog import query_payload, search, selectors
from catalog.intake.images import image_validate
from catalog.models import ProductImage
from workers import pipelines

WARMUP = 3  # the first encodes pay for loading the checkpoint (worker and here): not what a shopper waits for
WORKER_PING_TIMEOUT_S = 2.0


class Command(BaseCommand):
    help = "Measure the round trip of query encoding on the Celery search queue vs an in-process encoder."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--queries", type=int, default=50)
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "encode.json")

    def handle(self, *args, queries: int, out: Path, **options) -> None:
        from shop_search.celery import app

        version = selectors.model_version_active()
        if version is None:
            raise CommandError("no active model version: run `manage.py demo` (or demo_catalog) first")
        if not (app.control.ping(timeout=WORKER_PING_TIMEOUT_S) or []):
            raise CommandError("no Celery worker answers: start one with `celery -A shop_search worker -Q search`")
        images = list(
            ProductImage.objects.filter(status=ProductImage.Status.EMBEDDED).order_by("id")[: queries + WARMUP]
        )
        photos = [selectors.image_open(image=image) for image in images]
        payloads = [image_validate(_png(photo)).data for photo in photos]

        remote, local = [], []
        for index, data in enumerate(payloads):
            started = time.perf_counter()
            via_queue = search.query_encode_remote(data=data, version=version)
            remote_ms = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            message = pipelines.query_encode(photo_message=query_payload.photo_to_message(data), version_id=version.pk)
            local_ms = (time.perf_counter() - started) * 1000
            if via_queue.code.tobytes() != query_payload.encoding_from_message(message).code.tobytes():
                raise CommandError("the worker and this process encode differently: different checkpoints?")
            if index >= WARMUP:
                remote.append(remote_ms)
                local.append(local_ms)
        overhead = np.asarray(remote) - np.asarray(local)
        report = {
            "model_version": version.name,
            "queries": len(remote),
            "search_queue_ms": _stats(remote),
            "in_process_ms": _stats(local),
            "queue_overhead_ms": _stats(overhead.tolist()),
            "broker": settings.CELERY_BROKER_URL.split("@")[-1],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        self.stdout.write(json.dumps(report, indent=2))


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(float(np.percentile(values, 50)), 2),
        "p90": round(float(np.percentile(values, 90)), 2),
        "p99": round(float(np.percentile(values, 99)), 2),
        "mean": round(float(np.mean(values)), 2),
    }


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
