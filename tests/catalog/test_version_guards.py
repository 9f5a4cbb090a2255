"""Model versions cannot be left in a stuck or dangerous state: one indexing at a time (a database constraint), an
admin can cancel an indexing, the admin's switch and resume actions need the change permission, and the active or
indexing version cannot be deleted, neither in the admin nor through the ORM."""

import threading

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import IntegrityError, connection, transaction
from django.db.models import ProtectedError
from django.utils import timezone

from catalog.models import ImportJob, ModelVersion
from catalog.services import model_versions
from tests import factories

CHANGELIST = "/admin/catalog/modelversion/"


def _staff(client, username: str, *codenames: str):
    user = get_user_model().objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(content_type__app_label="catalog", codename__in=codenames))
    client.force_login(user)
    return client


def _actions(changelist) -> list[str]:
    form = changelist.context["action_form"]  # None when the user may run no action at all
    return [] if form is None else [choice[0] for choice in form.fields["action"].choices]


def _messages(response) -> str:
    return " ".join(str(message) for message in response.context["messages"])


@pytest.mark.django_db
def test_the_database_allows_one_indexing_version():
    ModelVersion.objects.create(name="a", status=ModelVersion.Status.INDEXING)
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelVersion.objects.create(name="b", status=ModelVersion.Status.INDEXING)


@pytest.mark.django_db(transaction=True)
def test_two_switches_started_at_once_cannot_both_start():
    """Both pass the service's "is anything indexing?" check before either writes: the index decides."""
    first = ModelVersion.objects.create(name="first", checkpoint="f.pt", code_bits=8, status="ready")
    second = ModelVersion.objects.create(name="second", checkpoint="s.pt", code_bits=8, status="ready")
    checked = threading.Barrier(2, timeout=30)
    real_filter = ModelVersion.objects.filter
    outcomes: dict[str, str] = {}

    def switch(version: ModelVersion) -> None:
        try:
            model_versions.model_version_switch(version=version)
            outcomes[version.name] = "indexing"
        except ValueError as exc:
            outcomes[version.name] = str(exc)
        finally:
            connection.close()

    waited: set[str] = set()

    def filter_then_wait(*args, **kwargs):
        result = real_filter(*args, **kwargs)
        thread = threading.current_thread().name
        if kwargs.get("status") == ModelVersion.Status.INDEXING and thread.startswith("sw") and thread not in waited:
            waited.add(thread)
            list(result)  # the check ran: now let the other switch run its check too
            checked.wait()
        return result

    ModelVersion.objects.filter = filter_then_wait  # type: ignore[method-assign]
    try:
        threads = [threading.Thread(target=switch, args=(v,), name=f"sw-{v.name}") for v in (first, second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        del ModelVersion.objects.filter
    assert len(outcomes) == 2 and list(outcomes.values()).count("indexing") == 1, outcomes
    assert any("still being indexed" in outcome for outcome in outcomes.values()), outcomes
    assert ModelVersion.objects.filter(status=ModelVersion.Status.INDEXING).count() == 1


@pytest.mark.django_db
def test_an_admin_cancels_an_indexing_and_search_keeps_its_version(client):
    current = ModelVersion.objects.create(name="current", checkpoint="c.pt", status=ModelVersion.Status.ACTIVE)
    fresh = ModelVersion.objects.create(name="fresh", checkpoint="f.pt", status=ModelVersion.Status.INDEXING)
    admin = _staff(client, "canceller", "view_modelversion", "change_modelversion")

    response = admin.post(CHANGELIST, {"action": "cancel_indexing", "_selected_action": [fresh.pk]}, follow=True)

    assert "Indexing cancelled: fresh" in _messages(response)
    fresh.refresh_from_db()
    current.refresh_from_db()
    assert (fresh.status, current.status) == ("ready", "active")
    # a version that served before goes back to retired; and now another switch may start
    rolled = ModelVersion.objects.create(
        name="rolled", checkpoint="r.pt", code_bits=8, status="retired", activated_at=timezone.now()
    )
    model_versions.model_version_switch(version=rolled)
    assert model_versions.model_version_cancel_indexing(version=rolled)
    assert ModelVersion.objects.get(pk=rolled.pk).status == "retired"
    assert not model_versions.model_version_cancel_indexing(version=rolled)  # not indexing any more


@pytest.mark.django_db
def test_switch_cancel_and_resume_need_the_change_permission(client):
    version = ModelVersion.objects.create(name="next", checkpoint="n.pt", status=ModelVersion.Status.READY)
    job = ImportJob.objects.create(merchant=factories.merchant(), state=ImportJob.State.RUNNING, chunks_total=1)
    viewer = _staff(client, "viewer", "view_modelversion", "view_importjob")

    actions = _actions(viewer.get(CHANGELIST))
    assert "switch_to_version" not in actions and "cancel_indexing" not in actions
    viewer.post(CHANGELIST, {"action": "switch_to_version", "_selected_action": [version.pk]}, follow=True)
    version.refresh_from_db()
    assert version.status == ModelVersion.Status.READY  # the action did not run

    assert "resume" not in _actions(viewer.get("/admin/catalog/importjob/"))
    response = viewer.post("/admin/catalog/importjob/", {"action": "resume", "_selected_action": [job.pk]}, follow=True)
    assert "chunks queued again" not in _messages(response)


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["active", "indexing"])
def test_the_active_or_indexing_version_cannot_be_deleted(client, status):
    version = ModelVersion.objects.create(name="serving", checkpoint="s.pt", status=status)
    spare = ModelVersion.objects.create(name="spare", checkpoint="x.pt", status=ModelVersion.Status.RETIRED)

    with pytest.raises(ProtectedError):
        version.delete()
    with pytest.raises(ProtectedError):
        ModelVersion.objects.filter(pk__in=[version.pk, spare.pk]).delete()
    assert ModelVersion.objects.filter(pk__in=[version.pk, spare.pk]).count() == 2

    admin = _staff(client, "deleter", "view_modelversion", "delete_modelversion", "change_modelversion")
    page = admin.get(f"{CHANGELIST}{version.pk}/delete/")
    assert page.status_code == 200 and page.context["protected"]
    admin.post(f"{CHANGELIST}{version.pk}/delete/", {"post": "yes"})
    bulk = admin.post(
        CHANGELIST, {"action": "delete_selected", "_selected_action": [version.pk, spare.pk], "post": "yes"}
    )
    assert bulk.status_code == 200 and bulk.context["protected"]
    assert ModelVersion.objects.filter(pk=version.pk).exists()
    # a retired version can be deleted
    spare.delete()
    assert not ModelVersion.objects.filter(pk=spare.pk).exists()
