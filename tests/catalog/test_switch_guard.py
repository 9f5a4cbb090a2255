"""Switching search to a version that scores worse than the active one on the golden set is refused unless the
admin overrides it, and the admin sees both versions' numbers side by side; rolling back stays one action."""

import pytest
from django.contrib.auth import get_user_model

from catalog.models import ModelVersion
from catalog.services import golden, model_versions

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/catalog/modelversion/"


def _numbers(r1: float) -> dict:
    return {"queries": 200, "r1": r1, "r10": min(1.0, r1 + 0.3), "map10": r1 + 0.05, "coarse_recall": 0.95,
            "final_recall": min(1.0, r1 + 0.3), "encode_ms_p50": 9.0, "encode_ms_p95": 14.0}  # fmt: skip


def _version(name: str, status: str, r1: float | None) -> ModelVersion:
    version = ModelVersion.objects.create(name=name, checkpoint=f"{name}.pt", code_bits=8, status=status)
    if r1 is not None:
        version = golden.version_golden_record(version_id=version.pk, numbers=_numbers(r1))
    return version


@pytest.fixture
def admin_client(client):
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    return client


def test_a_worse_version_is_refused_without_the_override_and_switched_with_it(django_capture_on_commit_callbacks):
    active = _version("v0", ModelVersion.Status.ACTIVE, r1=0.28)
    worse = _version("run7", ModelVersion.Status.READY, r1=0.02)
    with pytest.raises(model_versions.SwitchNeedsOverride, match=r"R@1 2\.0% against 28\.0%"):
        model_versions.model_version_switch(version=worse)
    assert ModelVersion.objects.get(pk=worse.pk).status == ModelVersion.Status.READY
    with django_capture_on_commit_callbacks(execute=False):
        model_versions.model_version_switch(version=worse, override=True)
    assert ModelVersion.objects.get(pk=worse.pk).status == ModelVersion.Status.INDEXING
    assert ModelVersion.objects.get(pk=active.pk).status == ModelVersion.Status.ACTIVE  # until indexing completes


def test_a_better_or_equal_version_switches_without_asking(django_capture_on_commit_callbacks):
    _version("v0", ModelVersion.Status.ACTIVE, r1=0.28)
    better = _version("run8", ModelVersion.Status.READY, r1=0.41)
    with django_capture_on_commit_callbacks(execute=False):
        model_versions.model_version_switch(version=better)
    assert ModelVersion.objects.get(pk=better.pk).status == ModelVersion.Status.INDEXING


@pytest.mark.parametrize(("candidate_r1", "active_r1", "reason"), [
    (None, 0.28, "has not been evaluated"),
    (0.5, None, "has no golden-set numbers"),
])  # fmt: skip
def test_a_version_that_cannot_be_compared_needs_the_override(candidate_r1, active_r1, reason):
    _version("v0", ModelVersion.Status.ACTIVE, r1=active_r1)
    candidate = _version("run9", ModelVersion.Status.READY, r1=candidate_r1)
    with pytest.raises(model_versions.SwitchNeedsOverride, match=reason):
        model_versions.model_version_switch(version=candidate)


def test_rolling_back_to_a_retired_version_stays_one_action(django_capture_on_commit_callbacks):
    _version("run8", ModelVersion.Status.ACTIVE, r1=0.41)
    previous = _version("v0", ModelVersion.Status.RETIRED, r1=0.28)
    with django_capture_on_commit_callbacks(execute=False):
        model_versions.model_version_switch(version=previous)
    assert ModelVersion.objects.get(pk=previous.pk).status == ModelVersion.Status.INDEXING


def test_the_admin_shows_both_versions_numbers_and_switches_only_when_told_to(
    admin_client, django_capture_on_commit_callbacks
):
    _version("v0", ModelVersion.Status.ACTIVE, r1=0.28)
    worse = _version("run7", ModelVersion.Status.READY, r1=0.02)
    page = admin_client.post(CHANGELIST, {"action": "switch_to_version", "_selected_action": [worse.pk]})
    assert page.status_code == 200
    html = page.content.decode()
    assert "Not switched: run7 scores worse than the active version v0" in html
    assert "run7 (candidate)" in html and "v0 (active)" in html and "2.0%" in html and "28.0%" in html
    assert 'name="override"' in html
    assert ModelVersion.objects.get(pk=worse.pk).status == ModelVersion.Status.READY

    with django_capture_on_commit_callbacks(execute=False):
        response = admin_client.post(
            CHANGELIST, {"action": "switch_to_version", "_selected_action": [worse.pk], "override": "1"}, follow=True
        )
    assert "run7 is indexing" in " ".join(str(m) for m in response.context["messages"])
    assert ModelVersion.objects.get(pk=worse.pk).status == ModelVersion.Status.INDEXING
