"""Image URLs: fetched with timeouts, counted size caps and a scheme/host policy checked on every hop; a local
HTTP server on 127.0.0.1 stands in for a catalog's image host (the policy is opened for it by a setting)."""

import http.server
import threading
import time

import pytest

from catalog.intake import IntakeError
from catalog.intake.fetch import url_fetch
from catalog.models import Product, ProductImage
from catalog.services import imports
from tests import factories
from tests.catalog.ingest_helpers import csv_bytes, picture, rejected, run_inline

IMAGE = picture(3)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0]
        if path == "/img.png":
            self._send(200, IMAGE, {"Content-Type": "image/png", "Content-Length": str(len(IMAGE))})
        elif path == "/redirect":
            self._send(302, b"", {"Location": "/img.png", "Content-Length": "0"})
        elif path == "/to-private":
            self._send(302, b"", {"Location": "http://10.1.2.3/img.png", "Content-Length": "0"})
        elif path == "/loop":
            self._send(302, b"", {"Location": "/loop", "Content-Length": "0"})
        elif path == "/big-undeclared":  # no Content-Length: only counting while reading stops it
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"\0" * 65536)
        elif path == "/big-declared":
            self._send(200, b"", {"Content-Length": str(10**9)})
        elif path == "/slow":
            time.sleep(1.5)
            self._send(200, IMAGE, {"Content-Length": str(len(IMAGE))})
        else:
            self._send(404, b"missing", {"Content-Length": "7"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # the fetcher hanging up on an oversized or slow answer is the point of those tests


@pytest.fixture
def server():
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


LOCAL = ("127.0.0.1/32",)


def test_loopback_private_link_local_and_other_schemes_are_refused_by_default(server):
    for url, message in [
        (f"{server}/img.png", "non-public"),
        ("http://10.0.0.1/x.png", "non-public"),
        ("http://169.254.169.254/latest/meta-data", "non-public"),
        ("http://[::1]/x.png", "non-public"),
        ("http://0.0.0.0/x.png", "non-public"),
        ("file:///etc/passwd", "http or https"),
        ("ftp://example.com/x.png", "http or https"),
        ("http://user:secret@example.com/x.png", "credentials"),
    ]:
        with pytest.raises(IntakeError, match=message):
            url_fetch(url)


def test_the_policy_is_checked_again_on_every_redirect(server):
    assert url_fetch(f"{server}/img.png", allowed_networks=LOCAL) == IMAGE
    assert url_fetch(f"{server}/redirect", allowed_networks=LOCAL) == IMAGE
    with pytest.raises(IntakeError, match="non-public"):
        url_fetch(f"{server}/to-private", allowed_networks=LOCAL)
    with pytest.raises(IntakeError, match="redirected more than"):
        url_fetch(f"{server}/loop", allowed_networks=LOCAL)


def test_sizes_are_capped_while_streaming_and_slow_hosts_time_out(server):
    with pytest.raises(IntakeError, match="larger than"):
        url_fetch(f"{server}/big-undeclared", allowed_networks=LOCAL, max_bytes=100_000)
    with pytest.raises(IntakeError, match="the limit is"):
        url_fetch(f"{server}/big-declared", allowed_networks=LOCAL)
    with pytest.raises(IntakeError, match="could not be fetched"):
        url_fetch(f"{server}/slow", allowed_networks=LOCAL, timeout=0.3)
    with pytest.raises(IntakeError, match="HTTP 404"):
        url_fetch(f"{server}/nope.png", allowed_networks=LOCAL)


@pytest.mark.django_db
def test_an_import_fetches_image_urls_under_the_configured_policy(server, settings):
    settings.IMAGE_FETCH_ALLOWED_NETWORKS = list(LOCAL)
    merchant = factories.merchant()
    rows = [
        {"sku": "U1", "title": "By URL", "images": f"{server}/img.png"},
        {"sku": "U2", "title": "Redirected", "images": f"{server}/redirect"},
        {"sku": "U3", "title": "Gone", "images": f"{server}/gone.png"},
        {"sku": "U4", "title": "Private", "images": "http://10.9.8.7/a.png"},
    ]
    job = run_inline(imports.import_job_create(merchant=merchant, manifest=csv_bytes(rows)))
    assert (job.ok, job.rejected) == (2, 2)
    assert [(error["line"], error["sku"]) for error in rejected(job)] == [(4, "U3"), (5, "U4")]
    assert "HTTP 404" in rejected(job)[0]["error"] and "non-public" in rejected(job)[1]["error"]
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["U1", "U2"]
    assert ProductImage.objects.get(product__sku="U1").source_url == f"{server}/img.png"


@pytest.mark.django_db
def test_a_chunk_fetches_its_urls_in_parallel_and_url_imports_use_small_chunks(server, settings):
    settings.IMAGE_FETCH_ALLOWED_NETWORKS = list(LOCAL)
    merchant = factories.merchant()
    rows = [{"sku": f"S{i}", "title": "Slow host", "images": f"{server}/slow?{i}"} for i in range(6)]
    rows += [{"sku": f"Z{i}", "title": "Fast", "images": f"{server}/img.png?{i}"} for i in range(30)]
    job = imports.import_job_create(merchant=merchant, manifest=csv_bytes(rows))
    assert job.chunks_total == 2  # 24 + 12 rows: URL chunks are small
    started = time.monotonic()
    run_inline(job)
    assert time.monotonic() - started < 6  # six 1.5 s fetches one after another would take 9 s
    assert (job.ok, job.rejected) == (36, 0)
