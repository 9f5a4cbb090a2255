"""A real Celery worker in its own process (prefork pool by default), on the pytest test database: what runs in
production, daemonic pool children included, which an in-process `start_worker(pool="solo")` does not have."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from django.db import connection

BASE_DIR = Path(__file__).resolve().parents[2]


def database_url() -> str:
    """The pytest test database, for worker processes (the embedded server's socket dir travels in OPTIONS)."""
    db = connection.settings_dict
    where = {"host": db["HOST"] or db["OPTIONS"].get("host", ""), "port": db["PORT"]}
    query = urllib.parse.urlencode({key: value for key, value in where.items() if value})
    credentials = urllib.parse.quote(db["USER"] or "") + ":" + urllib.parse.quote(db["PASSWORD"] or "") + "@"
    return f"postgresql://{credentials}/{db['NAME']}?{query}"


@contextlib.contextmanager
def worker_process(
    *, queues: str, name: str, pool: str = "prefork", env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """`celery worker -Q queues -P pool --concurrency 1` on the test database; stopped (whole group) on exit."""
    environment = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url(),
        **(env or {}),
    }
    command = [sys.executable, "-m", "celery", "-A", "shop_search", "worker", "-Q", queues, "-P", pool,
               "--concurrency", "1", "--loglevel", "WARNING", "-n", f"{name}@%h", "--without-heartbeat",
               "--without-gossip", "--without-mingle"]  # fmt: skip
    # Own session: the whole group is signalled (a pool child would outlive its parent otherwise).
    worker = subprocess.Popen(command, cwd=BASE_DIR, env=environment, start_new_session=True)
    try:
        yield worker
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
