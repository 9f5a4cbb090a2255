"""A real HTTP server on 127.0.0.1 that never finishes answering: what a hanging or trickling image host does.

/silent            accepts the request and sends nothing
/trickle-headers   sends its status line and headers one byte at a time, TRICKLE_S apart, forever
/trickle-body      sends complete headers, then the body one byte at a time, forever
/img.png           answers a small PNG at once (for mixing good and bad URLs)
"""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.catalog.ingest_helpers import picture

TRICKLE_S = 0.2
IMAGE = picture(5)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            block = self.request.recv(4096)
            if not block:
                return
            request += block
        path = request.split(b" ", 2)[1].split(b"?")[0].decode()
        try:
            if path == "/img.png":
                head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(IMAGE)}\r\n\r\n"
                self.request.sendall(head.encode() + IMAGE)
            elif path == "/silent":
                self._until_closed(b"")
            elif path == "/trickle-headers":
                self._until_closed(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"a" * 10**6)
            elif path == "/trickle-body":
                self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n")
                self._until_closed(b"\x89" * 10**6)
        except OSError:
            pass  # the fetcher gave up: the point of the test

    def _until_closed(self, data: bytes) -> None:
        for index in range(len(data) or 10**6):
            if self.server.stopping.is_set():  # type: ignore[attr-defined]
                return
            if data:
                self.request.sendall(data[index : index + 1])
            time.sleep(TRICKLE_S)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def hanging_server() -> Iterator[str]:
    """The server's base URL while the block runs."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.stopping = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.stopping.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()
