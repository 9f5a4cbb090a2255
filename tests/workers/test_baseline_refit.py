"""Version 0 refitted once the catalog has outgrown its fit: a new version, fitted with the same recipe on a sample of
today's catalog by a real worker, evaluated on the golden set and left for the admin's (guarded) switch; search stays
on the active version meanwhile."""

import pytest
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile

from catalog.models import ImageEmbedding, ModelVersion, ProductImage
from catalog.services import golden, model_versions
from shop_search.celery import app
from tests import factories
from tests.catalog.fitted import fitted_version
from tests.waiting import wait_until
from tests.workers import celery_process
from workers import tasks

CHANGELIST = "/admin/catalog/modelversion/"
RECIPE = {"input_size": 64}  # the active version 0's recipe (64 px: seconds to fit, not minutes)


def _catalog(count: int, *, start: int = 0) -> None:
    merchant = factories.merchant() if start == 0 else factories.Merchant.objects.get()
    for i in range(start, start + count):
        product = factories.product(merchant, sku=f"SKU-{i}", category="abc"[i % 3])
        row = ProductImage(product=product, sha256=f"{i:064d}")
        row.file.save(f"p{i}.png", ContentFile(factories.shape_png(i)), save=True)


def _active_version_zero(folder, *, fitted_on: int) -> ModelVersion:
    version = fitted_version(folder, name="v0-baseline", input_size=RECIPE["input_size"])
    version.config = {"baseline": RECIPE}
    version.save(update_fields=["config"])
    model_versions.model_version_activate(version=version)
    model_versions.baseline_fit_record(version=version, catalog_images=fitted_on, sample=fitted_on)
    return version


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_a_grown_catalog_gets_a_new_version_zero_from_a_real_worker_that_waits_for_the_switch(
    settings, tmp_path, celery_worker_on, pool
):
    """Prefork: a worker process as deployed (its pool child runs the beat task, the fit and the evaluation);
    solo: the in-process test worker."""
    settings.MODELS_DIR = tmp_path
    _catalog(6)
    active = _active_version_zero(tmp_path, fitted_on=6)
    assert model_versions.baseline_refit_due() is None  # the catalog it was fitted on
    _catalog(6, start=6)
    due = model_versions.baseline_refit_due()
    assert due is not None and (due.fitted_on, due.now, due.growth) == (6, 12, 2.0)
    assert str(due) == "The catalog holds 12 images, 2.0x the 6 that v0-baseline was fitted on"

    app.control.purge()
    if pool == "prefork":
        worker = celery_process.worker_process(queues="embed,train", name="refit", env={"MODELS_DIR": str(tmp_path)})
    else:
        worker = celery_worker_on("embed", "train")
    with worker as running:  # (beat tasks go to the default queue, embed)
        assert tasks.baseline_refit_check.delay().get(timeout=60)["refit"] is not None  # the beat's hourly check
        refit = ModelVersion.objects.exclude(pk=active.pk).get()
        # the refit is evaluated, then the active version (it had no numbers yet), in the same task
        wait_until(
            lambda: all(golden.version_golden(ModelVersion.objects.get(pk=pk)) is not None
                        for pk in (refit.pk, active.pk)) and (pool == "solo" or celery_process.alive(running)),
            timeout=180, interval=0.5, message=lambda: ModelVersion.objects.get(pk=refit.pk).metrics,
        )  # fmt: skip

    refit.refresh_from_db()
    active.refresh_from_db()
    assert refit.kind == ModelVersion.Kind.BASELINE and refit.status == ModelVersion.Status.READY
    assert active.status == ModelVersion.Status.ACTIVE  # search never moved by itself
    assert refit.config["baseline"] == RECIPE and refit.config["refit_of"] == active.pk
    assert refit.config["input_size"] == RECIPE["input_size"]  # fitted with the active version's recipe
    assert refit.metrics["fit"] == {"catalog_images": 12, "sample": 12}
    # evaluated on today's catalog, and the active version too, so that the switch can compare them
    assert ImageEmbedding.objects.filter(model_version=refit).count() == 12
    assert golden.version_golden(active) is not None
    # nothing more to refit: a refit waits for the admin, and its own fit is today's catalog
    assert model_versions.baseline_refit_if_due() is None
    assert model_versions.baseline_refit_due(version=refit) is None
    # the switch is the guarded one every new version goes through
    concern = model_versions.model_version_switch_concern(version=refit)
    worse = golden.version_golden(refit)["r1"] < golden.version_golden(active)["r1"]
    assert (concern is not None) == worse


@pytest.mark.django_db
def test_growth_is_measured_from_the_recorded_fit_and_only_for_version_zero(settings):
    _catalog(10)
    version = ModelVersion.objects.create(name="v0", checkpoint="v0.pt", code_bits=32, status="active")
    assert model_versions.baseline_refit_due() is None  # a fit from before the record: nothing to compare
    model_versions.baseline_fit_record(version=version, catalog_images=4, sample=4)
    assert model_versions.baseline_refit_due().growth == 2.5
    assert model_versions.baseline_refit_due(growth=3) is None
    settings.BASELINE_REFIT_GROWTH = 0  # never by itself
    assert model_versions.baseline_refit_due() is None and model_versions.baseline_refit_if_due() is None
    ProductImage.objects.filter(sha256__startswith="000000").update(status=ProductImage.Status.FAILED)
    settings.BASELINE_REFIT_GROWTH = 2
    assert model_versions.baseline_refit_due() is None  # images that failed to decode are not the catalog
    version.kind = ModelVersion.Kind.FASHIONNET
    version.save()
    assert model_versions.baseline_refit_due(growth=1) is None
    with pytest.raises(ValueError, match="trained network"):
        model_versions.model_version_refit_baseline(of=version)


@pytest.mark.django_db
def test_one_fit_at_a_time(django_capture_on_commit_callbacks):
    version = ModelVersion.objects.create(name="v0", checkpoint="v0.pt", code_bits=32, status="active")
    with django_capture_on_commit_callbacks(execute=False) as queued:
        refit = model_versions.model_version_refit_baseline(of=version)
    assert refit.status == ModelVersion.Status.TRAINING and refit.code_bits == 32 and len(queued) == 1
    with pytest.raises(ValueError, match=f"{refit.name} is being fitted already"):
        model_versions.model_version_refit_baseline(of=version)


@pytest.fixture
def admin_client(client):
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.com", "pw"))
    return client


@pytest.mark.django_db
def test_the_admin_sees_the_growth_and_refits_from_the_versions_page(admin_client, django_capture_on_commit_callbacks):
    _catalog(9)
    version = ModelVersion.objects.create(name="v0-baseline", checkpoint="v0.pt", code_bits=32, status="active")
    model_versions.baseline_fit_record(version=version, catalog_images=3, sample=3)
    page = admin_client.get(CHANGELIST).content.decode()
    assert "The catalog holds 9 images, 3.0x the 3 that v0-baseline was fitted on: refit it" in page
    assert "3 catalog images" in page  # the "fitted on" column
    with django_capture_on_commit_callbacks(execute=False) as queued:
        done = admin_client.post(
            CHANGELIST, {"action": "refit_version_zero", "_selected_action": [version.pk]}, follow=True
        )
    refit = ModelVersion.objects.exclude(pk=version.pk).get()
    assert refit.status == ModelVersion.Status.TRAINING and refit.config == {"baseline": {}, "refit_of": version.pk}
    assert f"Fitting {refit.name} on a sample of today" in done.content.decode()
    assert [callback.func.__name__ for callback in queued] == ["_send"]
    action = {"action": "refit_version_zero", "_selected_action": [version.pk]}
    again = admin_client.post(CHANGELIST, action, follow=True)
    assert "is being fitted already" in again.content.decode()
    assert ModelVersion.objects.count() == 2


def test_the_beat_schedule_runs_the_refit_check(settings):
    names = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert "workers.tasks.baseline_refit_check" in names
    assert "workers.tasks.baseline_refit_check" in app.tasks
