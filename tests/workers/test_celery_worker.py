"""A real Celery worker consumes a task from the real Redis broker and answers from the real database."""

import pytest
from celery.contrib.testing.worker import start_worker

from catalog.models import ModelVersion
from shop_search.celery import app
from workers import tasks


@pytest.mark.django_db(transaction=True)  # the worker thread reads through its own connection: data must commit
def test_a_real_worker_runs_a_task_end_to_end_over_the_broker():
    ModelVersion.objects.create(name="v-worker-test")
    app.control.purge()
    with start_worker(app, queues=["embed"], pool="solo", perform_ping_check=False, shutdown_timeout=10):
        result = tasks.ping_database.delay()
        assert result.get(timeout=30) == {"model_versions": 1}
