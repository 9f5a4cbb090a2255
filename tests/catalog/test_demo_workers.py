"""`manage.py demo` runs shoppers' queries in a worker process of their own: loading or importing a catalog (embed)
and training never occupy the process a search waits for."""

import contextlib
import socket

import pytest

from catalog.management.commands import demo
from shop_search.celery import app
from tests.waiting import wait_until
from tests.workers.celery_process import process_group, worker_environment


@pytest.mark.django_db(transaction=True)
def test_the_demo_starts_a_search_worker_that_consumes_only_the_search_queue():
    host = socket.gethostname()
    expected = {f"demo-search@{host}": {"search"}, f"demo@{host}": {"embed", "train"}}
    queues: dict[str, set[str]] = {}

    def every_worker_answers() -> bool:
        replies = app.control.inspect(destination=list(expected), timeout=1.0).active_queues() or {}
        queues.clear()
        queues.update({name: {queue["name"] for queue in active} for name, active in replies.items()})
        return set(queues) == set(expected)

    with contextlib.ExitStack() as workers:
        for command in demo.worker_commands():
            workers.enter_context(process_group(command, env=worker_environment()))
        wait_until(every_worker_answers, timeout=90, interval=0, message=lambda: queues)
        assert queues == expected
