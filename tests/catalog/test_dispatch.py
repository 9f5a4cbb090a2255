"""catalog.dispatch names tasks by string (the catalog never imports `workers`): the names and queues it uses must
be the ones the workers register and route, and writes are queued only once their transaction commits."""

import pytest
from django.db import transaction

from catalog import dispatch
from shop_search.celery import app


def test_every_dispatched_task_is_registered_under_its_name_and_routed_to_its_queue():
    from workers import tasks  # noqa: F401  (registers the tasks, as a worker's autodiscovery does)

    for task in dispatch.TASKS:
        registered = app.tasks[task.name]
        own_options = {key: value for key, value in registered._get_exec_options().items() if value is not None}
        routed = app.amqp.router.route(own_options, task.name, task_type=registered)
        assert routed["queue"].name == task.queue, task.name


@pytest.mark.django_db(transaction=True)
def test_writes_are_queued_after_commit_in_embed_sized_chunks(monkeypatch):
    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, args, queue: sent.append((name, len(args[0]), queue)))
    with transaction.atomic():
        dispatch.embed_images(image_ids=range(dispatch.EMBED_CHUNK + 1))
        assert sent == []
    assert sent == [
        (dispatch.EMBED_IMAGES.name, dispatch.EMBED_CHUNK, "embed"),
        (dispatch.EMBED_IMAGES.name, 1, "embed"),
    ]
    with transaction.atomic():
        dispatch.train_network(training_run_id=7)
        transaction.set_rollback(True)
    assert len(sent) == 2  # a rolled-back write queues nothing


@pytest.mark.django_db(transaction=True)
def test_activating_a_version_has_a_search_worker_load_it_once_the_switch_commits(monkeypatch):
    from catalog.models import ModelVersion
    from catalog.services.model_versions import model_version_activate

    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, args, queue: sent.append((name, queue)))
    version = ModelVersion.objects.create(name="v", code_bits=8, fc7_dim=4, status=ModelVersion.Status.READY)
    with transaction.atomic():
        model_version_activate(version=version)
        assert sent == []
    assert sent == [(dispatch.WARM_UP_SEARCH.name, "search")]
