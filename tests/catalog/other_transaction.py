"""A write made by another connection and left uncommitted for a while: how tests make transactions overlap."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from django.db import connection, transaction

WAIT_S = 10.0  # generous: the other thread only runs a few statements


class OtherTransaction:
    """Runs `write` in a thread of its own (own database connection) inside a transaction that stays open until
    `commit()` is called or the `with` block ends. On entering, the write has run and `result` holds its return."""

    def __init__(self, write: Callable[[], Any]) -> None:
        self._write = write
        self._written, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run)
        self.result: Any = None
        self._roll_back = False

    def _run(self) -> None:
        try:
            with transaction.atomic():
                self.result = self._write()
                self._written.set()
                self._release.wait(WAIT_S)
                if self._roll_back:
                    transaction.set_rollback(True)
        finally:
            connection.close()

    def __enter__(self) -> OtherTransaction:
        self._thread.start()
        assert self._written.wait(WAIT_S), "the other transaction's write did not finish"
        return self

    def commit(self, *, after_s: float = 0.0) -> None:
        """Let the other transaction commit (after `after_s`, e.g. while this thread is blocked on its rows)."""
        threading.Timer(after_s, self._release.set).start()

    def roll_back(self) -> None:
        """End the other transaction with a rollback instead (now), and wait until it has ended."""
        self._roll_back = True
        self._release.set()
        self._thread.join(WAIT_S)

    def __exit__(self, *exc_info: object) -> None:
        self._release.set()
        self._thread.join(WAIT_S)
