"""Throttles for the anonymous routes: one scoped rate per route, counted in the shared Redis cache per client.

The client is the address the request came from (`X-Forwarded-For` only through `NUM_PROXIES` trusted proxies).
An IPv6 client is keyed by its /64: one subscriber usually gets a whole /64 and can pick any address inside it,
so keying by the full address would hand it 2**64 throttle identities.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle

IPV6_CLIENT_PREFIX = 64


def client_key(address: str | None) -> str | None:
    """The throttle key of a client address: IPv4 as is, IPv6 (and IPv4-mapped IPv6) by network."""
    if not address:
        return address
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return address.strip()  # not an address (a misconfigured proxy): still one key per value
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_CLIENT_PREFIX), strict=False))
    return str(ip)


class ClientScopedRateThrottle(ScopedRateThrottle):
    """A `ScopedRateThrottle` keyed by `client_key`, reading its rate when asked (not at import), so a changed
    setting (or a test's override) takes effect."""

    def get_rate(self) -> str | None:
        return api_settings.DEFAULT_THROTTLE_RATES.get(self.scope)

    def get_ident(self, request: Any) -> str:
        return client_key(super().get_ident(request)) or ""
