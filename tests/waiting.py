"""One way for a test to wait for something another thread or process does: `wait_until`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], *, timeout: float, interval: float = 0.1, message: str | Callable[[], object] = ""
) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy, and return that.

    Fails the test (AssertionError) once `timeout` seconds have passed, with `message` (a callable is called then,
    so that it can describe the state at that moment). The predicate is asked once more at the deadline; an
    assertion inside it (a worker that died, say) fails the test at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError((message() if callable(message) else message) or f"not within {timeout} s")
        time.sleep(interval)
