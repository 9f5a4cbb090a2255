"""`manage.py bench_intake_memory`: the peak memory of importing one chunk of large photos, and of loading them
as one embedding batch does, each measured in a fresh process (peak RSS, and its rise over the process before
the step).

It writes N large JPEG photos (default 24 at 4000 x 3000, ~12 MP, what a phone takes) into a zip with a manifest,
imports them as ONE chunk inline (`imports.import_job_create` + `import_run_chunk`, what the worker task runs),
then, in another fresh process, loads the stored images the way `pipelines.images_embed` loads a batch
(`selectors.image_open` of each). The products go to a merchant of its own (`bench-intake-memory`), deleted at the
end, files included. No network, no worker: run it against any database, e.g. the checkout's embedded one:

    REDIS_URL=redis://127.0.0.1:6379/3 .venv/bin/python manage.py bench_intake_memory --images 24
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from django.core.management.base import BaseCommand
from PIL import Image, ImageDraw

from catalog import selectors
from catalog.models import Merchant, ProductImage
from catalog.services import imports, products

MERCHANT_SLUG = "bench-intake-memory"


def phone_photo(seed: int, width: int, height: int, **save) -> bytes:
    """A large JPEG with a photo's compressibility: smooth shading, shapes and sensor-like noise (`save`: more of
    Pillow's JPEG options, e.g. exif). bench_speed's intake section and the intake tests use it too."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(height // 20, height // 4))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    noise = rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", **{"quality": 90, **save})
    return buffer.getvalue()


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _rss_mb() -> float:
    """This process's resident memory now; also resets its peak (Linux: clear_refs 5), so that `_peak_mb` counts
    from here and not the start-up's own peak (Django's checks, the embedded database's)."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status_mb("VmRSS")


def _peak_mb() -> float:
    return _status_mb("VmHWM")  # peak resident memory since the last reset


class Command(BaseCommand):
    help = "Peak memory of importing one chunk of large photos, and of loading them for one embedding batch."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--images", type=int, default=24, help="photos in the chunk")
        parser.add_argument("--width", type=int, default=4000)
        parser.add_argument("--height", type=int, default=3000)
        parser.add_argument("--phase", choices=["all", "import", "embed-load"], default="all")
        parser.add_argument("--dir", default="", help="(internal) where the generated upload is")

    def handle(self, *args, **options) -> None:
        if options["phase"] == "import":
            self._import(Path(options["dir"]))
            return
        if options["phase"] == "embed-load":
            self._embed_load()
            return
        with tempfile.TemporaryDirectory(prefix="bench-intake-") as directory:
            started = time.perf_counter()
            self._write_upload(Path(directory), options["images"], options["width"], options["height"])
            upload_mb = (Path(directory) / "images.zip").stat().st_size / 1e6
            self.stdout.write(
                f"{options['images']} photos of {options['width']}x{options['height']}: {upload_mb:.1f} MB zip "
                f"(made in {time.perf_counter() - started:.1f} s)"
            )
            try:
                for phase in ("import", "embed-load"):
                    command = [sys.executable, "manage.py", "bench_intake_memory", "--phase", phase, "--dir", directory]
                    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                    numbers = json.loads(output.strip().splitlines()[-1])
                    self.stdout.write(
                        f"{phase:>10}: peak RSS {numbers['peak_mb']:.0f} MB, {numbers['rise_mb']:.0f} MB over the "
                        f"process before it ({numbers['seconds']:.1f} s; {numbers['what']})"
                    )
            finally:
                self._clean()

    def _write_upload(self, directory: Path, count: int, width: int, height: int) -> None:
        rows = ["sku,title,images"] + [f"BIG-{i},Large photo {i},photos/{i}.jpg" for i in range(count)]
        (directory / "manifest.csv").write_text("\n".join(rows) + "\n")
        with zipfile.ZipFile(directory / "images.zip", "w", zipfile.ZIP_STORED) as archive:
            for i in range(count):
                archive.writestr(f"photos/{i}.jpg", phone_photo(i, width, height))

    def _import(self, directory: Path) -> None:
        self._clean()
        merchant = Merchant.objects.create(name="Bench intake memory", slug=MERCHANT_SLUG)
        manifest = (directory / "manifest.csv").read_bytes()
        before = _rss_mb()
        started = time.perf_counter()
        with open(directory / "images.zip", "rb") as archive:
            job = imports.import_job_create(
                merchant=merchant, manifest=manifest, manifest_name="manifest.csv", archive=archive,
                chunk_rows=10_000, enqueue=False,
            )  # fmt: skip
        assert job.chunks_total == 1, job.chunks_total
        result = imports.import_run_chunk(chunk_id=job.chunks.get().pk)
        seconds = time.perf_counter() - started
        what = f"one chunk: {result.ok} rows imported, {result.rejected} rejected"
        print(json.dumps({"peak_mb": _peak_mb(), "rise_mb": _peak_mb() - before, "seconds": seconds, "what": what}))

    def _embed_load(self) -> None:
        ids = list(ProductImage.objects.filter(product__merchant__slug=MERCHANT_SLUG).values_list("id", flat=True))
        before = _rss_mb()
        started = time.perf_counter()
        loaded = [(image, selectors.image_open(image=image)) for image in selectors.images_by_id(image_ids=ids)]
        sizes = sorted({picture.size for _, picture in loaded})
        seconds = time.perf_counter() - started
        what = f"{len(loaded)} stored images held as one batch, sizes {sizes}"
        print(json.dumps({"peak_mb": _peak_mb(), "rise_mb": _peak_mb() - before, "seconds": seconds, "what": what}))

    def _clean(self) -> None:
        for product in products.Product.objects.filter(merchant__slug=MERCHANT_SLUG):
            products.product_delete(product=product)
        Merchant.objects.filter(slug=MERCHANT_SLUG).delete()
