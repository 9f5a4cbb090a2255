"""Celery tasks: thin. Each takes primary keys, loads rows, calls one service; retries and time limits live here."""

from celery import shared_task


@shared_task(name="workers.tasks.ping_database", acks_late=True)
def ping_database() -> dict:
    """Round trip through broker, worker and database: used by tests and the demo's readiness check."""
    from catalog.models import ModelVersion

    return {"model_versions": ModelVersion.objects.count()}
