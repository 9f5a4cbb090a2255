"""Request bodies are capped before they are spooled (catalog.api.body_limits): a declared oversized body is
refused with 413 from its Content-Length alone, over a real socket to a real gunicorn, before the client has sent
a byte of it; a file larger than its field allows is stopped while it streams; a refused import leaves nothing.
"""

from __future__ import annotations

import http.client
import io
import json
import sys
import time
import urllib.request

import pytest
from django.core.files.uploadhandler import MemoryFileUploadHandler
from django.http.multipartparser import MultiPartParser
from django.test import Client, override_settings
from django.urls import reverse

from catalog.api.body_limits import BodyLimit, BodyTooLarge, CappedUploadHandler
from catalog.intake.images import MAX_IMAGE_BYTES
from catalog.models import ImportChunk, ImportJob, Product
from tests import factories
from tests.catalog.ingest_helpers import csv_bytes, picture, zip_bytes
from tests.waiting import wait_until
from tests.workers import celery_process

PORT = 8031  # this worktree's port for live servers
REFUSE_MS = 500  # generous: a shared 2-core machine; the figure is printed (run with -s)


def _multipart(fields: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "----shop-search-test-boundary"
    body = io.BytesIO()
    for name, (filename, data) in fields.items():
        body.write(f"--{boundary}\r\n".encode())
        body.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode())
        body.write(b"Content-Type: application/octet-stream\r\n\r\n")
        body.write(data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.django_db(transaction=True)
def test_a_live_server_refuses_a_declared_oversized_body_before_reading_it():
    """gunicorn (as deployed) answers 413 after the headers alone: the client never sends the body."""
    command = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{PORT}", "-w", "1", "-k", "gthread",
               "--threads", "2", "shop_search.wsgi:application"]  # fmt: skip
    environment = celery_process.worker_environment({"ALLOWED_HOSTS": "127.0.0.1"})
    with celery_process.process_group(command, env=environment) as server:

        def up() -> bool:
            celery_process.alive(server)
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=2).status == 200
            except OSError:
                return False

        wait_until(up, timeout=60, interval=0.2, message="gunicorn did not start")
        timings = {}
        for path, declared in [
            ("/api/search", 10 * 1024**3),
            ("/api/merchant/products/1/images/", MAX_IMAGE_BYTES * 2),
            ("/api/merchant/imports/", 50 * 1024**3),
            ("/api/merchant/products/", 100 * 1024 * 1024),
        ]:
            started = time.perf_counter()
            connection = http.client.HTTPConnection("127.0.0.1", PORT, timeout=10)
            connection.putrequest("POST", path)
            connection.putheader("Content-Type", "multipart/form-data; boundary=x")
            connection.putheader("Content-Length", str(declared))
            connection.endheaders()  # the headers only: not a byte of the body is sent
            response = connection.getresponse()
            answer = response.read().decode()
            connection.close()
            timings[path] = (time.perf_counter() - started) * 1000
            assert response.status == 413, answer
            assert "accepts at most" in json.loads(answer)["detail"]
            assert f"{declared:,} bytes" in answer
        print("\nrefused from Content-Length (ms):", {path: round(ms, 1) for path, ms in timings.items()})
        assert max(timings.values()) < REFUSE_MS


@pytest.mark.django_db
def test_a_declared_oversized_search_is_refused_with_a_json_413(client):
    response = client.post(
        reverse("api:search"), b"", content_type="multipart/form-data; boundary=x", CONTENT_LENGTH=str(10**10)
    )
    assert response.status_code == 413
    assert "a search photo accepts at most" in response.json()["detail"]


@pytest.mark.django_db
def test_an_oversized_file_within_the_route_cap_is_stopped_while_it_streams(merchant_client):
    """The body fits the route (image cap + form overhead) but the file is over the image cap: the handler stops
    it mid-stream with 413, and the product gains no image."""
    merchant = factories.merchant()
    product = factories.product(merchant)
    client = merchant_client(merchant=merchant)
    body, content_type = _multipart({"file": ("big.jpg", b"\xff" * (MAX_IMAGE_BYTES + 1000))})
    response = client.generic(
        "POST", reverse("api:merchant-product-images", args=[product.pk]), body, content_type=content_type
    )
    assert response.status_code == 413, response.content
    assert "the file 'file' is larger than" in response.json()["detail"]
    assert product.images.count() == 0


@pytest.mark.django_db
@override_settings(IMPORT_ZIP_MAX_BYTES=1024 * 1024)
def test_an_import_over_the_zip_cap_is_refused_and_leaves_nothing(merchant_client, settings):
    client = merchant_client(merchant=factories.merchant())
    manifest = csv_bytes([{"sku": "A", "title": "a", "images": "a.png"}])
    archive = zip_bytes({"a.png": picture(1), "pad.bin": bytes(range(256)) * 8000})  # ~2 MB, stored as is
    archive = archive + b"\0" * (1024 * 1024)  # well over the cap whatever zlib does to the padding
    media_before = {p for p in settings.MEDIA_ROOT.rglob("*")} if settings.MEDIA_ROOT.exists() else set()
    response = client.post(
        reverse("api:merchant-import-list"),
        {"manifest": io.BytesIO(manifest), "images": io.BytesIO(archive)},
        format="multipart",
    )
    assert response.status_code == 413, response.content
    assert "'images'" in response.json()["detail"]
    assert ImportJob.objects.count() == ImportChunk.objects.count() == Product.objects.count() == 0
    media_after = {p for p in settings.MEDIA_ROOT.rglob("*")} if settings.MEDIA_ROOT.exists() else set()
    assert media_after == media_before


@pytest.mark.django_db
def test_the_admin_upload_form_is_capped_too(admin_client):
    response = admin_client.post(
        reverse("admin:catalog_importjob_upload"),
        b"",
        content_type="multipart/form-data; boundary=x",
        CONTENT_LENGTH=str(100 * 1024**3),
    )
    assert response.status_code == 413
    assert "a catalog import" in response.json()["detail"]


@pytest.mark.django_db
@override_settings(IMPORT_ZIP_MAX_BYTES=1024 * 1024)
def test_a_file_over_its_cap_in_an_admin_form_is_a_413_even_where_csrf_reads_the_form_first(admin_user):
    """The CSRF middleware reads request.POST before the admin's view: the refusal must still be a 413 (an
    exception there would be Django's 500)."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    client.cookies["csrftoken"] = "a" * 32  # a browser's CSRF cookie: the middleware then reads the form's token
    body, content_type = _multipart({"manifest": ("m.csv", b"sku,title\nA,a\n"), "images": ("i.zip", b"0" * 1_500_000)})
    response = client.generic("POST", reverse("admin:catalog_importjob_upload"), body, content_type=content_type)
    assert response.status_code == 413, response.status_code
    assert "the file 'images' is larger than 1,048,576 bytes" in response.json()["detail"]
    assert ImportJob.objects.count() == 0


def test_the_handler_caps_the_whole_body_when_no_length_was_declared():
    """A body whose length nobody declared (a chunked upload passed on by the server): Django's own parser, fed
    through the capped handler, stops at the route's total, though every file is under its field's cap."""
    limit = BodyLimit(total=100_000, files={"a": 80_000, "b": 80_000}, what="this test route")
    body, content_type = _multipart({"a": ("a.bin", b"1" * 70_000), "b": ("b.bin", b"2" * 70_000)})
    handlers = [CappedUploadHandler(limit=limit), MemoryFileUploadHandler()]
    meta = {"CONTENT_TYPE": content_type, "CONTENT_LENGTH": str(len(body))}
    with pytest.raises(BodyTooLarge, match="accepts at most 100,000 bytes"):
        MultiPartParser(meta, io.BytesIO(body), handlers).parse()
    # the same body under a route that allows it parses whole
    handlers = [CappedUploadHandler(limit=BodyLimit(200_000, {"a": 80_000})), MemoryFileUploadHandler()]
    _, files = MultiPartParser(meta, io.BytesIO(body), handlers).parse()
    assert files["a"].size == files["b"].size == 70_000
