"""An image URL's fetch gives up at its deadline, whatever part of the answer hangs: the connection, the headers
sent a byte at a time, or the body sent a byte at a time (a per-read timeout alone never trips on a trickle)."""

from __future__ import annotations

import time

import pytest

from catalog.intake import IntakeError
from catalog.intake.fetch import url_fetch
from catalog.intake.manifests import ManifestRow
from catalog.services.imports import URL_CHUNK_MAX_URLS, URL_CHUNK_ROWS, _chunks_split
from tests.catalog.hanging_http import IMAGE, hanging_server

LOCAL = ("127.0.0.1/32",)
DEADLINE_S = 1.0
SLACK_S = 1.0  # a shared, busy machine: thread start-up and scheduling


@pytest.mark.parametrize("path", ["/silent", "/trickle-headers", "/trickle-body"])
def test_a_hanging_host_is_given_up_at_the_deadline(path):
    with hanging_server() as base:
        assert url_fetch(f"{base}/img.png", allowed_networks=LOCAL, deadline=DEADLINE_S) == IMAGE
        started = time.monotonic()
        with pytest.raises(IntakeError, match=f"took longer than {DEADLINE_S:g} s"):
            # the per-read timeout (10 s) is far longer than the gaps between the server's bytes (0.2 s)
            url_fetch(f"{base}{path}", allowed_networks=LOCAL, deadline=DEADLINE_S, timeout=10)
        elapsed = time.monotonic() - started
    print(f"\n{path}: gave up after {elapsed:.2f} s (deadline {DEADLINE_S} s)")
    assert DEADLINE_S - 0.05 <= elapsed < DEADLINE_S + SLACK_S


def _row(line: int, urls: int, files: int = 0) -> ManifestRow:
    images = tuple(f"http://shop.example/{line}/{i}.jpg" for i in range(urls)) + tuple(
        f"{line}-{i}.png" for i in range(files)
    )
    return ManifestRow(line=line, sku=f"S{line}", title="t", images=images)


def test_chunks_holding_urls_are_capped_in_rows_and_urls():
    rows = [_row(i, 10) for i in range(10)] + [_row(100 + i, 0, 1) for i in range(300)] + [_row(999, 1)]
    chunks = _chunks_split(rows, 192)
    assert [row for chunk in chunks for row in chunk] == rows  # order kept, nothing lost
    for chunk in chunks:
        urls = sum(1 for row in chunk for image in row.images if image.startswith("http"))
        assert urls <= URL_CHUNK_MAX_URLS
        assert len(chunk) <= (URL_CHUNK_ROWS if urls else 192)
    # ten URLs a row: three rows a chunk; the fourth holds one such row, so 24 rows at most
    assert [len(chunk) for chunk in chunks[:4]] == [3, 3, 3, 24]
    assert [len(chunk) for chunk in chunks[4:]] == [192, 85, 1]  # file rows only: full chunks
