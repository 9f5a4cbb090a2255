"""Images are downscaled right after validation to a working copy (catalog.intake.images.image_downscale), while
the stored file keeps its full size; an import chunk holds one full-size picture at a time, and stored images are
opened as working copies (what embedding and the version-0 fit load)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from catalog import selectors
from catalog.intake.images import WORK_MAX_SIDE, image_downscale, image_open_downscaled, image_validate
from catalog.management.commands.bench_intake_memory import _peak_mb, _rss_mb, phone_photo
from catalog.models import ProductImage
from catalog.services import imports
from tests import factories
from tests.catalog.ingest_helpers import csv_bytes, run_inline, zip_bytes


def test_image_downscale_keeps_the_aspect_and_never_enlarges():
    wide = Image.new("RGB", (4000, 3000), (10, 20, 30))
    assert image_downscale(wide).size == (1024, 768)
    assert image_downscale(Image.new("L", (300, 2000))).size == (154, 1024)  # mode kept, longer side capped
    assert image_downscale(wide, 224).size == (224, 168)
    small = Image.new("RGB", (800, 600))
    assert image_downscale(small) is small  # nothing to do: the same picture
    assert WORK_MAX_SIDE == 1024


def test_validation_keeps_the_full_size_file_and_an_upright_working_copy():
    """A phone photo stored sideways with EXIF orientation 6: the working copy is upright and at most 1024 px; the
    stored file is the full-size upright picture."""
    photo = Image.open(io.BytesIO(phone_photo(1, 4000, 3000)))
    exif = photo.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90, exif=exif)
    validated = image_validate(buffer.getvalue())
    assert validated.image.size == (768, 1024)  # portrait once upright
    assert (validated.width, validated.height) == (3000, 4000)
    assert Image.open(io.BytesIO(validated.data)).size == (3000, 4000)
    stored = image_open_downscaled(validated.data)
    assert stored.size == (768, 1024) and stored.mode == "RGB"


@pytest.mark.django_db
def test_an_import_chunk_of_large_photos_stores_them_full_size_and_holds_one_at_a_time(settings):
    count = 8
    photos = {f"{i}.jpg": phone_photo(i, 4000, 3000) for i in range(count)}
    rows = [{"sku": f"BIG-{i}", "title": f"big {i}", "images": f"{i}.jpg"} for i in range(count)]
    job = imports.import_job_create(
        merchant=factories.merchant(), manifest=csv_bytes(rows), archive=io.BytesIO(zip_bytes(photos)),
        chunk_rows=count, enqueue=False,
    )  # fmt: skip
    assert job.chunks_total == 1
    before = _rss_mb()  # (and the peak counted from here)
    job = run_inline(job)
    rise = _peak_mb() - before
    full_picture_mb = 4000 * 3000 * 3 / 2**20  # one decoded photo: 34 MB
    print(f"\nimporting one chunk of {count} photos of 12 MP raised peak memory by {rise:.0f} MB")
    assert (job.ok, job.rejected) == (count, 0)
    # Holding every decoded photo of the chunk, as before, took count x 34 MB = 275 MB and more.
    assert rise < count * full_picture_mb / 2
    for image in ProductImage.objects.all():
        assert (image.width, image.height) == (4000, 3000)
        assert Image.open(image.file.path).size == (4000, 3000)  # the stored file: full size, for display
        assert selectors.image_open(image=image).size == (1024, 768)  # what embedding loads
        assert selectors.image_open(image=image, max_side=256).size == (256, 192)  # what the version-0 fit loads


@pytest.mark.django_db
def test_a_row_rejected_after_one_of_its_images_was_written_leaves_no_file(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    rows = [{"sku": "HALF", "title": "one good, one broken", "images": "good.jpg|broken.jpg"}]
    archive = zip_bytes({"good.jpg": phone_photo(3, 400, 300), "broken.jpg": b"not an image at all"})
    job = imports.import_job_create(
        merchant=factories.merchant(), manifest=csv_bytes(rows), archive=io.BytesIO(archive), enqueue=False
    )
    job = run_inline(job)
    assert (job.ok, job.rejected) == (0, 1)
    assert ProductImage.objects.count() == 0
    assert [p for p in (tmp_path / "products").rglob("*") if p.is_file()] == []
