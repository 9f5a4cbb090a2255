"""Admins switch search between model versions only through the indexing switch, never by editing a status."""

import pytest
from django.contrib.auth import get_user_model

from catalog.models import ModelVersion

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/catalog/modelversion/"


@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(user)
    return client


def switch(client, version: ModelVersion) -> str:
    """Run the admin action on `version`; returns the messages the admin shows."""
    response = client.post(CHANGELIST, {"action": "switch_to_version", "_selected_action": [version.pk]}, follow=True)
    return " ".join(str(message) for message in response.context["messages"])


def test_rolling_back_to_a_retired_version_starts_its_indexing(admin_client, django_capture_on_commit_callbacks):
    ModelVersion.objects.create(name="current", checkpoint="current.pt", status=ModelVersion.Status.ACTIVE)
    previous = ModelVersion.objects.create(name="previous", checkpoint="previous.pt", status="retired", code_bits=8)
    with django_capture_on_commit_callbacks() as callbacks:
        shown = switch(admin_client, previous)
    assert "previous is indexing" in shown
    previous.refresh_from_db()
    assert previous.status == ModelVersion.Status.INDEXING
    assert len(callbacks) == 1  # the finish-indexing check (no image is missing an embedding)
    assert ModelVersion.objects.get(name="current").status == ModelVersion.Status.ACTIVE  # until the switch


@pytest.mark.parametrize("status", ["training", "failed", "active"])
def test_versions_that_cannot_serve_are_refused(admin_client, status):
    version = ModelVersion.objects.create(name="v", checkpoint="v.pt", status=status)
    assert f"v is {status}" in switch(admin_client, version)
    version.refresh_from_db()
    assert version.status == status


def test_one_switch_at_a_time(admin_client):
    ModelVersion.objects.create(name="busy", checkpoint="b.pt", status=ModelVersion.Status.INDEXING)
    version = ModelVersion.objects.create(name="next", checkpoint="n.pt", status=ModelVersion.Status.READY)
    assert "busy is still being indexed" in switch(admin_client, version)
    version.refresh_from_db()
    assert version.status == ModelVersion.Status.READY


def test_status_cannot_be_edited_and_versions_cannot_be_added_by_hand(admin_client):
    version = ModelVersion.objects.create(name="v", checkpoint="v.pt", status=ModelVersion.Status.READY)
    admin_client.post(f"{CHANGELIST}{version.pk}/change/", {"name": "v", "status": "active"})
    version.refresh_from_db()
    assert version.status == ModelVersion.Status.READY
    assert admin_client.get(f"{CHANGELIST}add/").status_code == 403
