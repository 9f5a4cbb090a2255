"""A shopper's query encode expires when the web stops waiting for it: a search worker that reaches it later drops
it unrun (a backlog of abandoned queries never delays the queries still waited for)."""

import contextlib
import dataclasses
import time

import pytest

from catalog import dispatch
from shop_search.celery import app
from tests import factories
from tests.waiting import wait_until
from workers import pipelines


def _purge(queue: str) -> None:
    with app.connection_for_write() as connection, contextlib.suppress(Exception):  # undeclared: empty anyway
        connection.default_channel.queue_purge(queue)


@pytest.mark.django_db(transaction=True)
def test_a_query_nobody_waits_for_any_more_is_dropped_by_the_search_worker(monkeypatch, celery_worker_on):
    assert dispatch.ENCODE_QUERY.expires_s == dispatch.QUERY_ENCODE_TIMEOUT_S
    monkeypatch.setattr(dispatch, "ENCODE_QUERY", dataclasses.replace(dispatch.ENCODE_QUERY, expires_s=1.0))
    monkeypatch.setattr(dispatch, "QUERY_ENCODE_TIMEOUT_S", 1.0)
    sent, encoded = [], []
    real_send_task = app.send_task
    monkeypatch.setattr(app, "send_task", lambda *a, **kw: sent.append(real_send_task(*a, **kw)) or sent[-1])
    monkeypatch.setattr(pipelines, "query_encode", lambda **kwargs: encoded.append(kwargs) or {})
    _purge("search")

    with pytest.raises(TimeoutError):  # no search worker runs: the shopper gives up after the timeout
        dispatch.encode_query(photo=factories.png_bytes(size=(32, 32)), version_id=1)
    (result,) = sent
    time.sleep(0.5)  # the task has expired by now

    with celery_worker_on("search", purge=False):  # the expired query waits for it
        wait_until(lambda: result.state == "REVOKED", timeout=30, interval=0.1, message=lambda: result.state)

    assert result.state == "REVOKED"
    assert encoded == []  # the worker never encoded the photo nobody waits for
