"""Builders for ingest tests: manifests, zips of tiny distinct images, running an import's chunks inline."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import numpy as np
from PIL import Image, ImageDraw

from catalog import selectors
from catalog.models import ImportJob
from catalog.services import imports


def picture(seed: int, size: int = 48, fmt: str = "PNG") -> bytes:
    """A distinct little product shot per seed."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(180, 255, 3)))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(v) for v in rng.integers(0, 170, 3))
    x0, y0 = (int(v) for v in rng.integers(2, size // 3, 2))
    box = [x0, y0, x0 + size // 2, y0 + size // 2]
    (draw.ellipse if seed % 2 else draw.rectangle)(box, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def csv_bytes(rows: list[dict], columns: tuple[str, ...] = ("sku", "title", "category", "price", "images")) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue().encode()


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def catalog(n: int, *, first_seed: int = 0) -> tuple[bytes, bytes]:
    """A CSV manifest of n products, one image each, and the zip holding the images."""
    rows = [
        {"sku": f"SKU-{i}", "title": f"Product {i}", "category": "dress", "price": "9.99", "images": f"img/{i}.png"}
        for i in range(n)
    ]
    files = {f"img/{i}.png": picture(first_seed + i) for i in range(n)}
    return csv_bytes(rows), zip_bytes(files)


def run_inline(job: ImportJob) -> ImportJob:
    """Run every chunk of a job in this process (what the Celery tasks do), then reload the job."""
    for chunk_id in job.chunks.order_by("index").values_list("id", flat=True):
        imports.import_run_chunk(chunk_id=chunk_id)
    job.refresh_from_db()
    return job


def rejected(job: ImportJob) -> list[dict]:
    return selectors.import_job_rejected_rows(job=job)
