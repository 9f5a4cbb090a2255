"""The admin: a catalog upload form (same service as the API), live progress, rejected rows, duplicate findings."""

import io

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse

from catalog.models import DuplicateFinding, ImportJob
from tests import factories
from tests.catalog.ingest_helpers import catalog, run_inline, zip_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    admin_user = get_user_model().objects.create_superuser("boss", "boss@example.com", "pw")
    client.force_login(admin_user)
    return client


def test_upload_form_creates_a_job_with_live_progress_and_rejected_rows(staff_client):
    merchant = factories.merchant()
    changelist = staff_client.get(reverse("admin:catalog_importjob_changelist"))
    assert changelist.status_code == 200 and b"Upload a catalog" in changelist.content

    manifest, archive = catalog(3)
    manifest += b"BAD,,dress,1,\n"
    upload = reverse("admin:catalog_importjob_upload")
    assert staff_client.get(upload).status_code == 200
    response = staff_client.post(
        upload,
        {"merchant": merchant.pk, "manifest": io.BytesIO(manifest), "images": io.BytesIO(archive)},
    )
    job = ImportJob.objects.get()
    assert response.status_code == 302 and response.url == reverse("admin:catalog_importjob_change", args=[job.pk])
    progress_url = reverse("admin:catalog_importjob_progress", args=[job.pk])
    page = staff_client.get(response.url)
    assert page.status_code == 200 and progress_url.encode() in page.content  # the page polls while running
    progress = staff_client.get(progress_url).json()
    assert (progress["state"], progress["processed"], progress["total"]) == ("pending", 1, 4)

    run_inline(job)
    progress = staff_client.get(progress_url).json()
    assert (progress["state"], progress["ok"], progress["rejected"], progress["percent"]) == ("done", 3, 1, 100.0)
    page = staff_client.get(reverse("admin:catalog_importjob_change", args=[job.pk])).content.decode()
    assert "title is required" in page and "<td>5</td>" in page and progress_url not in page


def test_a_bad_upload_shows_the_error_and_stores_nothing(staff_client):
    merchant = factories.merchant()
    evil = io.BytesIO(zip_bytes({"../evil.png": b"x"}))
    response = staff_client.post(
        reverse("admin:catalog_importjob_upload"),
        {"merchant": merchant.pk, "manifest": io.BytesIO(b"sku,title,images\nA,a,evil.png\n"), "images": evil},
    )
    assert response.status_code == 200 and b"path traversal" in response.content
    assert ImportJob.objects.count() == 0


def test_duplicate_findings_list_for_admins(staff_client):
    assert staff_client.get(reverse("admin:catalog_duplicatefinding_changelist")).status_code == 200
    assert DuplicateFinding.objects.count() == 0
