"""Retraining from the admin: the add form starts a run on the train queue; the run page shows its curves."""

import pytest
from django.contrib.auth import get_user_model

from catalog.admin import loss_curve_svg
from catalog.models import ModelVersion, TrainingRun

pytestmark = pytest.mark.django_db

RUNS = "/admin/catalog/trainingrun/"


@pytest.fixture
def admin_client(client):
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    return client


def test_the_add_form_starts_a_run_that_fine_tunes_the_active_network(admin_client, django_capture_on_commit_callbacks):
    ModelVersion.objects.create(name="trained", kind="fashionnet", checkpoint="/models/t.pt", status="active")
    form = {"epochs": "3", "code_bits": "128", "input_size": "48", "fine_tune_active": "on"}
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(f"{RUNS}add/", form)
    assert response.status_code == 302
    run = TrainingRun.objects.get()
    assert run.state == TrainingRun.State.PENDING and run.created_by.username == "root"
    assert run.config == {
        "epochs": 3,
        "model": {"code_bits": 128, "input_size": 48},
        "init_checkpoint": "/models/t.pt",
    }
    assert len(callbacks) == 1  # train_network, after the commit


def test_a_run_starts_from_the_active_version_0_and_bad_input_is_refused(admin_client):
    ModelVersion.objects.create(name="v0", kind="baseline", checkpoint="/models/v0.pt", status="active")
    admin_client.post(f"{RUNS}add/", {"fine_tune_active": "on"})  # the defaults, as "Add" shows them
    assert TrainingRun.objects.get().config == {"init_checkpoint": "/models/v0.pt"}  # the warm start's version 0
    admin_client.post(f"{RUNS}add/", {"epochs": "2"})  # unticked: TrainConfig fits its own version 0 to start from
    assert TrainingRun.objects.order_by("pk").last().config == {"epochs": 2}
    response = admin_client.post(f"{RUNS}add/", {"epochs": "0", "code_bits": "63", "input_size": "64"})
    assert response.status_code == 200 and TrainingRun.objects.count() == 2


def test_fields_left_blank_leave_their_defaults_to_the_train_worker(admin_client):
    admin_client.post(f"{RUNS}add/", {"epochs": "", "code_bits": "", "input_size": "32"})
    assert TrainingRun.objects.get().config == {"model": {"input_size": 32}}


def test_the_run_page_shows_progress_curve_and_metrics(admin_client):
    metrics = [{"epoch": 0, "loss": 2.5, "val_r1": 0.4}, {"epoch": 1, "loss": 1.25, "val_r1": 0.7}]
    run = TrainingRun.objects.create(state="running", progress=0.5, epoch_metrics=metrics)
    page = admin_client.get(f"{RUNS}{run.pk}/change/").content.decode()
    assert "50%" in page and "<polyline" in page and "val_r1" in page and "0.7" in page


def test_loss_curve_goes_down_when_the_loss_does():
    svg = loss_curve_svg([{"loss": 3.0}, {"loss": 2.0}, {"loss": 1.0}])
    points = svg.split('points="')[1].split('"')[0].split()
    heights = [float(point.split(",")[1]) for point in points]
    assert heights == sorted(heights)  # SVG y grows downwards: a falling loss is a rising y
    assert loss_curve_svg([{"loss": 1.0}]) == ""
