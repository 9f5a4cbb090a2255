"""Zip safety: traversal, absolute paths, symlinks, bombs, entry caps, corrupt archives; all rejected whole."""

import io
import zipfile

import pytest
from django.urls import reverse

from catalog.intake import IntakeError
from catalog.intake.zips import SafeZip, zip_check
from catalog.models import ImportJob, Product, ProductImage
from tests import factories
from tests.catalog.ingest_helpers import csv_bytes, picture, zip_bytes


def _zip_with(name: str, data: bytes = b"x", *, mode: int | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ok.png", picture(1))
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.external_attr = mode << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, message",
    [
        ("../../etc/evil.png", "path traversal"),
        ("img/../../evil.png", "path traversal"),
        ("..\\..\\evil.png", "path traversal"),
        ("/etc/passwd", "absolute"),
        ("C:/windows/evil.png", "absolute"),
    ],
)
def test_zip_slip_names_are_rejected(name, message):
    with pytest.raises(IntakeError, match=message):
        zip_check(io.BytesIO(_zip_with(name)))


def test_symlinks_are_rejected():
    with pytest.raises(IntakeError, match="symbolic link"):
        zip_check(io.BytesIO(_zip_with("link.png", b"/etc/passwd", mode=0o120777)))


def test_a_zip_bomb_is_stopped_by_the_ratio_while_reading():
    bomb = _zip_with("bomb.png", b"\0" * (4 * 1024 * 1024))  # 4 MB of zeros deflate to ~4 kB
    assert len(bomb) < 20_000
    with pytest.raises(IntakeError, match="zip bomb"):
        zip_check(io.BytesIO(bomb))


def test_entry_size_total_size_and_entry_count_caps_count_real_bytes():
    archive = zip_bytes({f"{i}.png": bytes(range(256)) * 40 for i in range(5)})  # 10 kB each
    safe = SafeZip(io.BytesIO(archive), max_entry_bytes=4096)
    with pytest.raises(IntakeError, match="larger than"):
        safe.read("0.png")
    with pytest.raises(IntakeError, match="expands to more than"):
        zip_check(io.BytesIO(archive), max_total_bytes=30_000)
    with pytest.raises(IntakeError, match="entries"):
        SafeZip(io.BytesIO(archive), max_entries=4)
    assert sorted(zip_check(io.BytesIO(archive))) == [f"{i}.png" for i in range(5)]


def test_lying_headers_do_not_matter():
    """A header claiming a tiny size does not let more bytes through: the bytes read are what is counted."""
    buffer = io.BytesIO(_zip_with("big.png", b"\1" * 300_000))
    data = bytearray(buffer.getvalue())
    # Patch the central directory's uncompressed size of the last entry to 10 bytes.
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    with pytest.raises(IntakeError):
        zip_check(io.BytesIO(bytes(data)))


def test_not_a_zip_and_duplicate_names():
    with pytest.raises(IntakeError, match="not a zip"):
        zip_check(io.BytesIO(b"PK\x03\x04 definitely not"))
    with pytest.raises(IntakeError, match="twice"):
        zip_check(io.BytesIO(zip_bytes({"a/x.png": b"1", "a//x.png": b"2"})))


def test_base_names_resolve_when_unique():
    with SafeZip(io.BytesIO(zip_bytes({"shop/a.png": b"1", "x/b.png": b"2", "y/b.png": b"3"}))) as archive:
        assert archive.resolve("a.png") == "shop/a.png"
        assert archive.resolve("./shop/a.png") == "shop/a.png"
        assert archive.resolve("b.png") is None  # ambiguous
        assert archive.resolve("../a.png") is None


@pytest.mark.django_db
def test_the_api_rejects_a_bad_zip_with_400_and_stores_nothing(merchant_client):
    client = merchant_client(merchant=factories.merchant())
    manifest = csv_bytes([{"sku": "A", "title": "a", "images": "ok.png"}])
    for archive, message in [
        (_zip_with("../evil.png"), "path traversal"),
        (_zip_with("bomb.png", b"\0" * (4 * 1024 * 1024)), "zip bomb"),
    ]:
        response = client.post(
            reverse("api:merchant-import-list"),
            {"manifest": io.BytesIO(manifest), "images": io.BytesIO(archive)},
            format="multipart",
        )
        assert response.status_code == 400, response.content
        assert message in response.json()["detail"]
    assert ImportJob.objects.count() == Product.objects.count() == ProductImage.objects.count() == 0
