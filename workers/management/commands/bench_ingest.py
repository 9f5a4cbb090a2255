"""`manage.py bench_ingest`: catalog ingest throughput end to end, embedding included, on real workers.

Renders N distinct products (workers.ml.datasets.render, cached under var/bench/), uploads them as one import
(manifest + zip) through `imports.import_job_create`, starts a real Celery worker with `--workers` pool processes
(one torch thread each) and, once its pool has loaded the network, measures until every image is embedded by
the active version (the start's CPU is reported apart: `worker_warm_up_cpu_s`). Then it profiles a
sample in this process to show where the time goes per image. With no active version, version 0 is fitted first
(not counted). Run it against its own database so the demo shop is not touched, e.g.

    createdb -h var/pgdata -U postgres shop_search_bench   # or any empty database with pgvector
    DATABASE_URL='postgresql://postgres:@/shop_search_bench?host=/work/main/var/pgdata' \\
    REDIS_URL=redis://127.0.0.1:6379/14 .venv/bin/python manage.py bench_ingest --products 10000 --workers 2

Measured on the 2-core CI-class machine (shared with other jobs, so wall clock varies; worker CPU time does not):
10,000 products, 2 worker processes: all 10,000 rows, images and embeddings, 86 images/s end to end (43 per
worker core); 2,000 products on 1 worker process: 76 images/s. Per worker CPU second: 87-97 images. Per image
(one thread): network 7.3 ms (80%), duplicate check 0.6, import (zip read, validate + re-encode, rows, file) 0.7,
embedding write 0.3, loading the stored image 0.2.
Since workers run version 0 on ONNX Runtime (2,000 products, 2 worker processes, a quiet machine): 287 images/s
end to end and 197 per worker CPU second, against 184 and 113 with WORKER_ENCODER_RUNTIME=torch in the same run.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import torch
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from PIL import Image

from catalog import query_payload, selectors
from catalog.dispatch import EMBED_CHUNK
from catalog.intake.images import image_validate
from catalog.intake.manifests import ManifestRow
from catalog.intake.zips import SafeZip
from catalog.models import ImageEmbedding, ImportJob, Merchant, ModelVersion, ProductImage
from catalog.services import embeddings, imports, model_versions
from shop_search.celery import app
from workers import pipelines
from workers.ml.baseline import fit_baseline
from workers.ml.datasets.render import product_spec, render_product

RENDER_SIZE = 128  # the renderer's default photo size; JPEG at this size is ~4 kB, like a catalog thumbnail
JPEG_QUALITY = 90
FIT_SAMPLE = 512  # version 0 fits in seconds on this many and is representative of the encoder's cost
PROFILE_SAMPLE = 256  # images profiled in-process for the per-stage breakdown
EMBED_STAGES = ("load_stored_image", "keypoints_sift_and_write", "encode_network", "embedding_rows_build",
                "embedding_db_write", "duplicate_check", "mark_embedded")  # fmt: skip
POLL_S = 0.25
# A started worker is idle once its CPU grows by less than IDLE_CPU_S in each of IDLE_CHECKS checks IDLE_CHECK_S apart
# (an idle Celery worker polls its broker for a few milliseconds a second).
IDLE_CHECK_S, IDLE_CHECKS, IDLE_CPU_S = 0.5, 2, 0.02


def _render(seed: int) -> tuple[int, bytes, str, str, list[str]]:
    spec = product_spec(seed)
    buffer = io.BytesIO()
    render_product(spec, 0, RENDER_SIZE).image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return seed, buffer.getvalue(), spec.category, spec.title, list(spec.attribute_names)


def bench_catalog(n: int, directory: Path) -> tuple[Path, Path]:
    """manifest.csv + images.zip for n rendered products, made once and cached."""
    manifest, archive = directory / "manifest.csv", directory / "images.zip"
    if manifest.exists() and archive.exists():
        return manifest, archive
    directory.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        rendered = pool.map(_render, range(n), chunksize=64)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:  # JPEGs do not compress
        for seed, data, *_ in rendered:
            zf.writestr(f"images/{seed}.jpg", data)
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sku", "title", "category", "attributes", "price", "images"])
        for seed, _, category, title, attributes in rendered:
            writer.writerow([f"B-{seed}", title[:300], category, "|".join(attributes), f"{10 + seed % 90}.99",
                             f"{seed}.jpg"])  # fmt: skip
    return manifest, archive


class Command(BaseCommand):
    help = "Benchmark catalog ingest end to end (import + embedding) on real worker processes."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--products", type=int, default=2000)
        parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker pool processes")
        parser.add_argument("--chunk-rows", type=int, default=imports.IMPORT_CHUNK_ROWS)
        parser.add_argument("--timeout", type=float, default=3600.0)
        parser.add_argument("--json", type=Path, help="also write the results here")
        parser.add_argument("--no-profile", action="store_true", help="skip the per-stage breakdown")

    def handle(self, *args, products: int, workers: int, chunk_rows: int, timeout: float, **options) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        directory = Path(settings.VAR_DIR) / "bench" / f"ingest-{products}-{RENDER_SIZE}"
        started = time.perf_counter()
        manifest, archive = bench_catalog(products, directory)
        self.stdout.write(f"catalog: {products} products in {directory} ({time.perf_counter() - started:.1f} s)")
        version = selectors.model_version_active() or self._fit_version_zero(archive)
        self.stdout.write(f"model version: {version} ({version.code_bits} bits, fc7 {version.fc7_dim})")
        merchant = Merchant.objects.create(name="Bench", slug=f"bench-{int(time.time() * 1000)}")

        worker, warm_up_cpu_s = self._start_worker(workers)
        try:
            result = self._run(merchant, manifest, archive, chunk_rows, timeout, worker, workers)
        finally:
            worker.terminate()
            worker.wait(timeout=60)
        result.update(workers=workers, products=products, model_version=version.pk,
                      worker_warm_up_cpu_s=round(warm_up_cpu_s, 2))  # fmt: skip
        if not options["no_profile"]:
            profile = result["profile_ms_per_image"] = self._profile(archive, version)
            # The model's own batch throughput on one thread, measured in this run: what ingest is held against, per
            # wall second (as noisy as the machine) and per CPU second (images per core, whatever else runs).
            model = result["model_images_per_s"] = round(1000 / profile["encode_network"], 1)
            model_cpu = result["model_images_per_cpu_s"] = round(1000 / profile["encode_network_cpu"], 1)
            result["ingest_per_worker_process_to_model"] = round(result["images_per_s_per_worker_process"] / model, 2)
            result["ingest_per_worker_cpu_s_to_model"] = round(result["images_per_worker_cpu_s"] / model_cpu, 2)
        self._report(result)
        if options["json"]:
            options["json"].write_text(json.dumps(result, indent=2))

    # --- phases -----------------------------------------------------------------------------------------------

    def _fit_version_zero(self, archive: Path) -> ModelVersion:
        self.stdout.write(f"no active model version: fitting version 0 on {FIT_SAMPLE} images (not timed)")
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()[:FIT_SAMPLE]
            pictures = [Image.open(io.BytesIO(zf.read(name))).convert("RGB") for name in names]
        version = ModelVersion.objects.create(name=f"v0-bench-{int(time.time())}", kind="baseline",
                                              status=ModelVersion.Status.READY, code_bits=64, fc7_dim=128)  # fmt: skip
        path = fit_baseline(pictures, out_path=Path(settings.MODELS_DIR) / f"{version.name}.pt", code_bits=64,
                            fc7_dim=128)  # fmt: skip
        encoder = pipelines.encoder_at(path)
        model_versions.model_version_ready(
            version=version, checkpoint=path, code_bits=encoder.code_bits, fc7_dim=encoder.fc7_dim,
            config=encoder.version_info,
        )  # fmt: skip
        return model_versions.model_version_activate(version=version)

    def _start_worker(self, workers: int) -> tuple[subprocess.Popen, float]:
        """The worker, once its pool has warmed up, and the CPU seconds its start took."""
        env = {**os.environ, "DATABASE_URL": settings.DATABASE_URL, "REDIS_URL": settings.REDIS_URL,
               "WORKER_TORCH_THREADS": "1"}  # fmt: skip
        name = f"bench-{os.getpid()}"
        command = [sys.executable, "-m", "celery", "-A", "shop_search", "worker", "-Q", "embed",
                   "--concurrency", str(workers), "--loglevel", "WARNING", "-n", f"{name}@%h",
                   "--without-gossip", "--without-mingle"]  # fmt: skip
        process = subprocess.Popen(command, cwd=settings.BASE_DIR, env=env)
        deadline = time.monotonic() + 120
        while not any(name in key for reply in (app.control.ping(timeout=1.0) or []) for key in reply):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise CommandError("the benchmark worker did not start")
        return process, _wait_until_idle(process.pid, deadline=deadline)

    def _run(
        self, merchant, manifest: Path, archive: Path, chunk_rows: int, timeout: float, worker, workers: int
    ) -> dict:
        cpu_before, machine_before = _cpu_seconds(worker.pid), _machine_cpu_seconds()
        t0 = time.perf_counter()
        with archive.open("rb") as handle, transaction.atomic():
            job = imports.import_job_create(
                merchant=merchant, manifest=manifest.read_bytes(), manifest_name=manifest.name, archive=handle,
                chunk_rows=chunk_rows,
            )  # fmt: skip
        t_created = time.perf_counter()
        rows_done: float | None = None
        embedded_done: float | None = None
        images = ProductImage.objects.filter(product__merchant=merchant)
        while embedded_done is None:
            if time.perf_counter() - t0 > timeout:
                raise CommandError(f"not done after {timeout:.0f} s")
            if worker.poll() is not None:
                raise CommandError("the benchmark worker died")
            time.sleep(POLL_S)
            job.refresh_from_db()
            if rows_done is None and job.state == ImportJob.State.DONE:
                rows_done = time.perf_counter()
            if rows_done is not None and not images.filter(status=ProductImage.Status.PENDING).exists():
                embedded_done = time.perf_counter()
        assert rows_done is not None
        cpu = _cpu_seconds(worker.pid) - cpu_before
        machine_cpu = _machine_cpu_seconds() - machine_before
        embedded = ImageEmbedding.objects.filter(product__merchant=merchant).count()
        wall = embedded_done - t0
        return {
            "job": job.pk,
            "total": job.total, "processed": job.processed, "ok": job.ok, "rejected": job.rejected,
            "images": images.count(), "embeddings": embedded,
            "wall_s": round(wall, 2),
            "upload_s": round(t_created - t0, 2),
            "rows_done_s": round(rows_done - t0, 2),
            "embedding_tail_s": round(embedded_done - rows_done, 2),
            "images_per_s": round(embedded / wall, 1),
            "images_per_s_per_worker_process": round(embedded / wall / workers, 1),
            "worker_cpu_s": round(cpu, 1),
            "images_per_worker_cpu_s": round(embedded / cpu, 1) if cpu else None,
            "machine_cpu_s": round(machine_cpu, 1),  # workers + PostgreSQL + Redis + this process
            "images_per_machine_cpu_s": round(embedded / machine_cpu, 1) if machine_cpu else None,
        }  # fmt: skip

    def _profile(self, archive: Path, version: ModelVersion) -> dict:
        """Per-image cost of each stage on a sample, in this process (one thread), writes rolled back: the import
        as a chunk runs it, then the embed task's stages (`pipelines.images_embed`) in batches of EMBED_CHUNK.
        `encode_network` alone is the model's own batch throughput, measured in the same run."""
        torch.set_num_threads(1)
        with zipfile.ZipFile(archive) as zf:
            blobs = [zf.read(name) for name in zf.namelist()[:PROFILE_SAMPLE]]
        n = len(blobs)
        timings: dict[str, float] = {}
        cpu: dict[str, float] = {}

        def timed(name: str, fn):
            start, start_cpu = time.perf_counter(), time.process_time()
            value = fn()
            timings[name] = timings.get(name, 0.0) + (time.perf_counter() - start) * 1000 / n
            cpu[name] = cpu.get(name, 0.0) + (time.process_time() - start_cpu) * 1000 / n
            return value

        with SafeZip(archive.open("rb")) as safe:
            names = list(safe.entries)[:n]
            timed("zip_read", lambda: [safe.read(name) for name in names])
            timed("validate_reencode", lambda: [image_validate(blob) for blob in blobs])
            encoder = pipelines.encoder_of(version)
            with transaction.atomic():
                merchant = Merchant.objects.create(name="Profile", slug=f"profile-{int(time.time() * 1000)}")
                rows = [
                    ManifestRow(line=i + 2, sku=f"P-{i}", title=f"t{i}", category="dress", images=(name,))
                    for i, name in enumerate(names)
                ]
                imported = timed("import_chunk_total", lambda: imports.rows_import(
                    merchant=merchant, rows=rows, archive=safe))  # fmt: skip
                added = imported.new_image_ids
                names_to_delete = list(ProductImage.objects.filter(pk__in=added).values_list("file", flat=True))
                warm = [selectors.image_open(image=image) for image in selectors.images_by_id(image_ids=added[:8])]
                encoder.encode(warm)  # warm-up outside the timing
                for start in range(0, len(added), EMBED_CHUNK):
                    self._profile_batch(added[start : start + EMBED_CHUNK], version, encoder, timed)
                # The task as it runs (keypoints extracted while the write waits), on as many other images: its
                # time next to the sum of the stages above is what that overlap saves.
                others = list(safe.entries)[n : 2 * n]
                again = imports.rows_import(merchant=merchant, archive=safe, rows=[
                    ManifestRow(line=i + 2, sku=f"Q-{i}", title=f"q{i}", category="dress", images=(name,))
                    for i, name in enumerate(others)
                ]).new_image_ids  # fmt: skip
                names_to_delete += ProductImage.objects.filter(pk__in=again).values_list("file", flat=True)
                if len(again) == n:
                    for start in range(0, n, EMBED_CHUNK):
                        batch = again[start : start + EMBED_CHUNK]
                        timed("embed_task_whole", lambda batch=batch: pipelines.images_embed(image_ids=batch))
                transaction.set_rollback(True)
        storage = ProductImage._meta.get_field("file").storage
        for name in names_to_delete:
            storage.delete(name)
        timings = {name: round(value, 3) for name, value in timings.items()}
        # This process's CPU per image (a busy machine stretches wall time, not CPU time): what per-core figures use.
        timings.update({f"{name}_cpu": round(value, 3) for name, value in cpu.items()})
        # import_chunk_total already includes zip_read and validate_reencode.
        timings["db_rows_and_file_store"] = round(
            timings["import_chunk_total"] - timings["zip_read"] - timings["validate_reencode"], 3
        )
        stages = ("import_chunk_total", *EMBED_STAGES)
        timings["total_single_thread"] = round(sum(timings[stage] for stage in stages), 3)
        timings["embed_stages_sum"] = round(sum(timings[stage] for stage in EMBED_STAGES), 3)
        return timings

    @staticmethod
    def _profile_batch(image_ids: list[int], version: ModelVersion, encoder, timed) -> None:
        """One embed task's stages, in `pipelines.images_embed`'s order, each timed on its own."""
        images = selectors.images_by_id(image_ids=image_ids)
        loaded = timed("load_stored_image", lambda: [(image, selectors.image_open(image=image)) for image in images])
        timed("keypoints_sift_and_write", lambda: pipelines.keypoints_store(loaded))
        encoding = timed("encode_network", lambda: encoder.encode([picture for _, picture in loaded]))
        rows = timed("embedding_rows_build", lambda: [
            embeddings.embedding_row(image=image, model_version=version, bits=encoding.bits[i], fc7=encoding.fc7[i],
                                     **query_payload.predictions(encoding, i, encoder.label_space))
            for i, (image, _) in enumerate(loaded)
        ])  # fmt: skip
        timed("embedding_db_write", lambda: embeddings.embeddings_bulk_save(model_version=version, rows=rows))
        timed("duplicate_check", lambda: embeddings.duplicates_find(model_version=version, image_ids=image_ids))
        timed("mark_embedded", lambda: embeddings.images_mark_embedded(image_ids=image_ids))

    def _report(self, result: dict) -> None:
        self.stdout.write(json.dumps(result, indent=2))


def _machine_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return times.user + times.system + getattr(times, "nice", 0.0)


def _wait_until_idle(pid: int, *, deadline: float) -> float:
    """The worker answers pings before its pool processes have loaded the network (`worker_process_init`): wait
    until its CPU counter stays still, so that the measured ingest is the steady state of a running worker, not its
    start. Returns the CPU seconds spent so far (start and warm-up)."""
    spent = _cpu_seconds(pid)
    quiet = 0
    while quiet < IDLE_CHECKS and time.monotonic() < deadline:
        time.sleep(IDLE_CHECK_S)
        now = _cpu_seconds(pid)
        quiet = quiet + 1 if now - spent < IDLE_CPU_S else 0
        spent = now
    return spent


def _cpu_seconds(pid: int) -> float:
    """CPU time of a worker and its pool processes so far."""
    process = psutil.Process(pid)
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total
