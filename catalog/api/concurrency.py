"""A cap on concurrent shopper searches per web process.

A photo search holds a web thread, and while it encodes the photo in process (catalog.query_encoder) a core; with
SEARCH_ENCODER=worker it waits on the `search` queue instead (up to QUERY_ENCODE_TIMEOUT_S). Without a cap, a burst
of searches (or a slow search queue) takes every thread of every process, and the merchant API, the admin and
/healthz wait behind them. Over the cap a search waits for a slot at most SEARCH_SLOT_WAIT_MS (a burst of a few
searches, each tens of milliseconds in process, clears in that time: the shopper sees a slower answer, not an error),
then is answered with 503 and Retry-After instead of queueing any longer: the client retries, and the other routes
keep their threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings

RETRY_AFTER_S = 2


class SearchBusy(RuntimeError):
    """Every search slot of this web process is taken."""

    retry_after_s = RETRY_AFTER_S


class ConcurrencyCap:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._semaphore = threading.BoundedSemaphore(limit)

    @contextmanager
    def slot(self, wait_s: float = 0.0) -> Iterator[None]:
        acquired = self._semaphore.acquire(timeout=wait_s) if wait_s > 0 else self._semaphore.acquire(blocking=False)
        if not acquired:
            raise SearchBusy(
                f"too many searches in progress on this server ({self.limit} at once); try again in a moment"
            )
        try:
            yield
        finally:
            self._semaphore.release()


_caps: dict[int, ConcurrencyCap] = {}
_caps_lock = threading.Lock()


def search_slot() -> ConcurrencyCap:
    """The process's cap, sized by settings.SEARCH_MAX_CONCURRENT (one cap per distinct value, so a test's override
    gets its own)."""
    limit = max(1, int(settings.SEARCH_MAX_CONCURRENT))
    with _caps_lock:
        cap = _caps.get(limit)
        if cap is None:
            cap = _caps[limit] = ConcurrencyCap(limit)
        return cap
