"""`manage.py bench_encode`: the encode stage of a shopper's search, by each way of encoding, on the same photos in
the same run, next to the network's own inference time.

For each held-out shopper photo (the golden set's views of the catalog's products, workers.pipelines.
golden_query_photos), interleaved so that the machine's load hits every path alike:
- model: the version's ONNX network alone (ONNX Runtime, one thread) on the already preprocessed photo;
- (c) in process: catalog.query_encoder in this process (what SEARCH_ENCODER=inprocess does in a web process):
  preprocessing + network, then with the SIFT keypoints the verify stage needs;
- (a) Celery, as before: the validated upload (re-encoded at full size, lossless for a PNG) as base64 through the
  `search` queue and the result backend (catalog.dispatch.encode_query), keypoints extracted by the worker;
- (b) Celery, lean: the small JPEG of the downscaled photo (catalog.query_payload.photo_jpeg) instead, which is
  what SEARCH_ENCODER=worker sends now.
Every path encodes the same downscaled photo (catalog.query_encoder.query_image) but (a), which sends the upload.
The transport a Celery path adds is its time minus (c)'s with keypoints, photo by photo. JSON (`--out`) and a
markdown table (stdout). Needs an active version with its ONNX export and a running `search` worker (`manage.py
demo` starts both); torch is not loaded by any measured path.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from catalog import dispatch, query_encoder, query_payload, selectors
from catalog.intake.images import image_validate
from inference.preprocess import preprocess_batch

WARMUP = 3  # the first encodes pay for loading the network (worker and here): not what a shopper waits for
WORKER_PING_TIMEOUT_S = 2.0
PATHS = ("model", "inprocess", "inprocess_keypoints", "celery_before", "celery_lean")


class Command(BaseCommand):
    help = "Measure the encode stage by each way of encoding (in process, Celery before/lean) against the network."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--queries", type=int, default=50)
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "encode.json")

    def handle(self, *args, queries: int, out: Path, **options) -> None:
        from shop_search.celery import app
        from workers.pipelines import golden_query_photos

        version = selectors.model_version_active()
        if version is None:
            raise CommandError("no active model version: run `manage.py demo` (or demo_catalog) first")
        if not (app.control.ping(timeout=WORKER_PING_TIMEOUT_S) or []):
            raise CommandError("no Celery worker answers: start one with `celery -A shop_search worker -Q search`")
        encoder = query_encoder.encoder_for(version)
        if encoder is None:
            raise CommandError(f"{version} has no usable ONNX export beside its checkpoint (see the log)")
        uploads = [photo for _, _, _, photo in golden_query_photos(version=version)[: queries + WARMUP]]
        if not uploads:
            raise CommandError("the catalog has no usable images to photograph")

        times: dict[str, list[float]] = {path: [] for path in PATHS}
        sizes: dict[str, list[int]] = {"celery_before": [], "celery_lean": []}
        for index, upload in enumerate(uploads):
            validated = image_validate(upload)
            image = query_encoder.query_image(validated.image)
            measured = {path: _timed(call) for path, call in _paths(encoder, version, validated, image).items()}
            if index < WARMUP:
                continue
            for path, ms in measured.items():
                times[path].append(ms)
            sizes["celery_before"].append(len(query_payload.photo_to_message(validated.data)))
            sizes["celery_lean"].append(len(query_payload.photo_to_message(query_payload.photo_jpeg(image))))

        with_keypoints = np.asarray(times["inprocess_keypoints"])
        report = {
            "model_version": version.name,
            "input_size": encoder.preprocessing.input_size,
            "queries": len(times["model"]),
            "photo_side_median": int(np.median([max(_size(u)) for u in uploads])),
            "encode_ms": {path: _stats(values) for path, values in times.items()},
            "transport_ms": {
                path: _stats((np.asarray(times[path]) - with_keypoints).tolist())
                for path in ("celery_before", "celery_lean")
            },
            "inprocess_over_model_p50": round(
                float(np.median(times["inprocess"])) / float(np.median(times["model"])), 2
            ),
            "payload_bytes_median": {path: int(np.median(values)) for path, values in sizes.items()},
            "broker": settings.CELERY_BROKER_URL.split("@")[-1],
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        self.stdout.write(markdown(report))
        self.stdout.write(f"\nJSON: {out}")


def _paths(encoder, version, validated, image) -> dict[str, Callable[[], object]]:
    """Each way of encoding this photo, as a call to time (the same order for every photo)."""
    batch, _ = preprocess_batch([image], encoder.preprocessing)
    lean = query_payload.photo_jpeg(image)
    return {
        "model": lambda: encoder.network(batch),
        "inprocess": lambda: query_encoder.query_encode(image=image, version=version),
        "inprocess_keypoints": lambda: query_encoder.query_encode(image=image, version=version, keypoints=True),
        "celery_before": lambda: dispatch.encode_query(photo=validated.data, version_id=version.pk, keypoints=True),
        "celery_lean": lambda: dispatch.encode_query(photo=lean, version_id=version.pk, keypoints=True),
    }


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return (time.perf_counter() - started) * 1000


def _size(upload: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(upload)).size


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(float(np.percentile(values, 50)), 2),
        "p95": round(float(np.percentile(values, 95)), 2),
        "p99": round(float(np.percentile(values, 99)), 2),
        "mean": round(float(np.mean(values)), 2),
    }


LABELS = {
    "model": "network alone (ONNX Runtime, 1 thread)",
    "inprocess": "(c) in process: preprocessing + network",
    "inprocess_keypoints": "(c) in process, + SIFT keypoints",
    "celery_before": "(a) Celery as before: base64 upload, + keypoints",
    "celery_lean": "(b) Celery, lean: small JPEG, + keypoints",
}


def markdown(report: dict) -> str:
    lines = [
        f"Encode stage, version {report['model_version']} ({report['input_size']} px), {report['queries']} shopper "
        f"photos (median longer side {report['photo_side_median']} px); ms",
        "",
        "| path | p50 | p95 | transport p50 (vs in process + keypoints) | payload |",
        "|---|---|---|---|---|",
    ]
    for path, label in LABELS.items():
        stats = report["encode_ms"][path]
        transport = report["transport_ms"].get(path, {}).get("p50", "")
        payload = report["payload_bytes_median"].get(path, "")
        lines.append(f"| {label} | {stats['p50']} | {stats['p95']} | {transport} | {payload} |")
    lines.append("")
    lines.append(f"In process / network alone, p50: {report['inprocess_over_model_p50']}x")
    return "\n".join(lines)
