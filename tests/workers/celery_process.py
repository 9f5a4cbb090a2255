"""A real Celery worker in its own process (prefork pool by default), on the pytest test database: what runs in
production, daemonic pool children included, which the in-process worker of tests/conftest.py's `celery_worker_on`
(solo pool) does not have. `process_group` starts and stops any such command (manage.py demo's workers too);
`alive` lets a `wait_until` predicate fail at once when the worker has died."""

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


def alive(worker: subprocess.Popen) -> bool:
    """True while the worker process runs; fails the test once it has exited (for `wait_until` predicates)."""
    assert worker.poll() is None, f"the worker exited with {worker.returncode}"
    return True


def worker_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, pointed at the test settings and the test database, with `env` on top."""
    return {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url(), **(env or {})}


@contextlib.contextmanager
def process_group(command: list[str], *, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`command` in a session of its own, run from the repository; on exit its whole group gets SIGTERM (then
    SIGKILL after 30 s): a pool child would outlive its parent otherwise."""
    process = subprocess.Popen(command, cwd=BASE_DIR, env=env, start_new_session=True)
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


@contextlib.contextmanager
def worker_process(
    *, queues: str, name: str, pool: str = "prefork", env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """`celery worker -Q queues -P pool --concurrency 1` on the test database; stopped (whole group) on exit.
    A test may kill it sooner (`os.killpg(worker.pid, signal.SIGKILL)`, as the OOM killer would)."""
    command = [sys.executable, "-m", "celery", "-A", "shop_search", "worker", "-Q", queues, "-P", pool,
               "--concurrency", "1", "--loglevel", "WARNING", "-n", f"{name}@%h", "--without-heartbeat",
               "--without-gossip", "--without-mingle"]  # fmt: skip
    with process_group(command, env=worker_environment(env)) as worker:
        yield worker
