"""What many test modules share: a merchant's API client and a real Celery worker in this process.

A worker in its own process (prefork pool, as in production) is tests/workers/celery_process.py; waiting for
something a worker does is tests/waiting.py's `wait_until`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def merchant_client() -> Callable[..., object]:
    """`merchant_client(user)`: a DRF APIClient that sends `user`'s API token, as a merchant's scripts do.
    `merchant_client(merchant=m)` first makes a user ("<slug>-user") who belongs to merchant m; either way the
    user is `client.user`."""
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    def build(user=None, *, merchant=None) -> APIClient:
        if user is None:
            user = get_user_model().objects.create_user(f"{merchant.slug}-user")
        if merchant is not None:
            merchant.users.add(user)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
        client.user = user
        return client

    return build


@pytest.fixture
def celery_worker_on() -> Callable[..., contextlib.AbstractContextManager]:
    """`with celery_worker_on("embed", "train"):` a real Celery worker consumes those queues, in a thread of this
    process (solo pool), over the real Redis broker; it is stopped when the block ends. The test must be
    `django_db(transaction=True)`: the worker reads through its own connection, so data must be committed.

    Whatever waits on the broker is purged first (`app.control.purge()`); a test that queued work for the worker
    before starting it passes `purge=False`."""
    from celery.contrib.testing.worker import start_worker

    from shop_search.celery import app
    from workers import tasks  # noqa: F401  (registers the tasks with the in-process worker)

    @contextlib.contextmanager
    def on(*queues: str, purge: bool = True) -> Iterator[object]:
        if purge:
            app.control.purge()
        with start_worker(
            app, queues=list(queues), pool="solo", perform_ping_check=False, shutdown_timeout=10
        ) as worker:
            yield worker

    return on
