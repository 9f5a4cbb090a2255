"""A real Celery worker consumes a task from the real Redis broker and answers from the real database."""

import pytest

from catalog.models import ModelVersion
from workers import tasks


@pytest.mark.django_db(transaction=True)  # the worker thread reads through its own connection: data must commit
def test_a_real_worker_runs_a_task_end_to_end_over_the_broker(celery_worker_on):
    ModelVersion.objects.create(name="v-worker-test")
    with celery_worker_on("embed"):
        result = tasks.ping_database.delay()
        assert result.get(timeout=30) == {"model_versions": 1}
