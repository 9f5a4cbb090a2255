"""`manage.py demo` runs shoppers' queries in a worker process of their own: loading or importing a catalog (embed)
and training never occupy the process a search waits for."""

import contextlib
import os
import signal
import socket
import subprocess
import time

import pytest

from catalog.management.commands import demo
from shop_search.celery import app
from tests.workers.celery_process import BASE_DIR, database_url


@pytest.mark.django_db(transaction=True)
def test_the_demo_starts_a_search_worker_that_consumes_only_the_search_queue():
    commands = demo.worker_commands()
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": database_url()}
    host = socket.gethostname()
    expected = {f"demo-search@{host}": {"search"}, f"demo@{host}": {"embed", "train"}}
    workers = [subprocess.Popen(command, cwd=BASE_DIR, env=environment, start_new_session=True) for command in commands]
    try:
        queues: dict[str, set[str]] = {}
        deadline = time.monotonic() + 90
        while set(queues) != set(expected) and time.monotonic() < deadline:
            replies = app.control.inspect(destination=list(expected), timeout=1.0).active_queues() or {}
            queues = {name: {queue["name"] for queue in active} for name, active in replies.items()}
        assert queues == expected
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)
