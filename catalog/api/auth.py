"""`POST /api/auth/token/`: a merchant's API token for a username and password, throttled per client.

DRF's `ObtainAuthToken` sets no throttles, so a password could be guessed at the web's full speed. Every attempt
counts (right or wrong): the `auth` scope allows a few per minute per client address (`AUTH_THROTTLE_RATE`).
"""

from __future__ import annotations

from rest_framework.authtoken.views import ObtainAuthToken

from catalog.api.throttling import ClientScopedRateThrottle


class AuthTokenRateThrottle(ClientScopedRateThrottle):
    scope = "auth"


class ThrottledObtainAuthToken(ObtainAuthToken):
    throttle_classes = (AuthTokenRateThrottle,)
    throttle_scope = "auth"
