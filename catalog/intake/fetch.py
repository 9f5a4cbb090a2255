"""Image URLs from manifests and the merchant API, fetched under a policy: http(s) only, public addresses only
(checked on the resolved address of every hop, and that address is the one connected to), bytes counted while
streaming, a deadline for the whole download.

The deadline covers everything after the name is resolved: connecting, the status line and headers, the body,
every redirect. A socket timeout alone would not: it bounds each read, and a server that sends one byte of its
headers every few seconds never trips it. So a watchdog timer shuts the socket down when the deadline passes, which
wakes the blocked read at once, and the fetch fails with the deadline's message. (Resolving the name is bounded by
the system resolver's own timeouts.)"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence

from catalog.intake import READ_BLOCK, IntakeError
from catalog.intake.images import MAX_IMAGE_BYTES

IMAGE_FETCH_TIMEOUT_S = 10.0  # per connect/read: a catalog host slower than this is down for our purposes
IMAGE_FETCH_DEADLINE_S = 30.0  # whole download: a trickling server must not hold an import chunk hostage
IMAGE_FETCH_MAX_REDIRECTS = 3  # CDNs redirect once or twice; more is a loop or a trick
IMAGE_FETCH_SCHEMES = ("http", "https")


def _address_allowed(address: str, allowed_networks: Sequence[str]) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in ipaddress.ip_network(network, strict=False) for network in allowed_networks):
        return True
    # is_global is False for loopback, private, link-local, shared (CGNAT), reserved and documentation ranges.
    return ip.is_global and not ip.is_multicast


def _resolve_allowed(host: str, port: int, allowed_networks: Sequence[str]) -> str:
    """The address to connect to: every address the name resolves to must pass, so a name that mixes a public and
    a private address cannot be used to reach the private one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise IntakeError(f"the image host {host!r} could not be resolved") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise IntakeError(f"the image host {host!r} could not be resolved")
    for address in addresses:
        if not _address_allowed(address, allowed_networks):
            raise IntakeError(f"the image host {host!r} resolves to a non-public address ({address}); not fetched")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that passed the policy, not to whatever the name resolves to a moment later."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def _expire(connection: http.client.HTTPConnection, expired: threading.Event) -> None:
    """The watchdog: mark the fetch expired and shut its socket down, which ends any read blocked on it."""
    expired.set()
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)


def url_fetch(
    url: str,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout: float = IMAGE_FETCH_TIMEOUT_S,
    deadline: float = IMAGE_FETCH_DEADLINE_S,
    allowed_networks: Sequence[str] = (),
) -> bytes:
    """GET an image URL under the fetch policy: http(s) only, public addresses only (checked on the resolved
    address of every hop, redirects included) unless `allowed_networks` opens a range, bytes counted while
    streaming. IntakeError says what went wrong."""
    ends = time.monotonic() + deadline
    expired = threading.Event()
    for _ in range(IMAGE_FETCH_MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in IMAGE_FETCH_SCHEMES:
            raise IntakeError(f"image URLs must be http or https, not {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise IntakeError(f"the image URL {url!r} has no host")
        if parts.username or parts.password:
            raise IntakeError("image URLs must not carry credentials")
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError as exc:
            raise IntakeError(f"the image URL {url!r} has an invalid port") from exc
        address = _resolve_allowed(parts.hostname, port, allowed_networks)
        remaining = ends - time.monotonic()
        if remaining <= 0:
            raise IntakeError(f"the image URL took longer than {deadline:g} s to download")
        connection_class = _PinnedHTTPSConnection if parts.scheme.lower() == "https" else _PinnedHTTPConnection
        connection = connection_class(parts.hostname, port, address, min(timeout, remaining))
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        watchdog = threading.Timer(remaining, _expire, (connection, expired))
        watchdog.daemon = True
        watchdog.start()
        try:
            connection.request("GET", target, headers={"User-Agent": "shop_search-ingest/1", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise IntakeError(f"the image URL redirected ({response.status}) without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                raise IntakeError(f"the image URL answered HTTP {response.status}")
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise IntakeError(f"the image at the URL is {int(declared):,} bytes; the limit is {max_bytes:,}")
            buffer = bytearray()
            while block := response.read(READ_BLOCK):
                buffer += block
                if len(buffer) > max_bytes:
                    raise IntakeError(f"the image at the URL is larger than {max_bytes:,} bytes")
            if expired.is_set():  # the watchdog cut the body short
                raise IntakeError(f"the image URL took longer than {deadline:g} s to download")
            return bytes(buffer)
        except (OSError, http.client.HTTPException) as exc:
            if expired.is_set():
                raise IntakeError(f"the image URL took longer than {deadline:g} s to download") from exc
            raise IntakeError(f"the image URL could not be fetched: {exc}") from exc
        finally:
            watchdog.cancel()
            connection.close()
    raise IntakeError(f"the image URL redirected more than {IMAGE_FETCH_MAX_REDIRECTS} times")
