"""Version 0 end to end on a real worker: fit the baseline on the catalog, index it, activate it, encode a query."""

import base64
import io

import numpy as np
import pytest
from django.core.files.base import ContentFile
from django.db import transaction
from PIL import Image

from catalog import geometry, query_payload
from catalog.models import ImageEmbedding, ImageKeypoints, ModelVersion, ProductImage
from catalog.services import model_versions
from tests import factories
from tests.waiting import wait_until
from workers import pipelines, tasks


def _picture(seed: int) -> bytes:
    return factories.shape_png(seed, ellipse=(30, 36), rectangle=(34, 28))


@pytest.mark.django_db(transaction=True)
def test_version_zero_is_fitted_indexed_and_activated_by_a_real_worker(settings, tmp_path, celery_worker_on):
    settings.MODELS_DIR = tmp_path
    merchant = factories.merchant()
    for i in range(12):
        product = factories.product(merchant, sku=f"SKU-{i}", category="dress" if i % 2 else "bag")
        row = ProductImage(product=product, sha256=f"{i:064d}")
        row.file.save(f"p{i}.png", ContentFile(_picture(i)), save=True)

    with celery_worker_on("train", "embed", "search"):
        with transaction.atomic():
            version = model_versions.model_version_bootstrap(code_bits=32, fc7_dim=8)
        # train_baseline -> embed_images -> embed_finish_indexing (which polls until every image is in)
        wait_until(
            lambda: ModelVersion.objects.get(pk=version.pk).status == ModelVersion.Status.ACTIVE, timeout=120,
            interval=0.5, message=lambda: ModelVersion.objects.get(pk=version.pk).metrics,
        )  # fmt: skip
        version.refresh_from_db()
        assert version.status == ModelVersion.Status.ACTIVE, version.metrics
        assert ImageEmbedding.objects.filter(model_version=version).count() == 12
        assert set(ProductImage.objects.values_list("status", flat=True)) == {"embedded"}
        assert version.code_bits == 32 and 1 <= version.fc7_dim <= 8
        # Every image got its local features (geometric verification) on the embedding path, once.
        stored = {row.image_id: geometry.unpack(row.data) for row in ImageKeypoints.objects.all()}
        assert set(stored) == set(ProductImage.objects.values_list("pk", flat=True))
        # (a flat rectangle on a plain backdrop may show SIFT almost nothing; the ellipses always show something)
        assert sum(len(features) > 0 for features in stored.values()) >= 6
        assert {max(features.size) for features in stored.values()} == {geometry.CATALOG_SIDE}

        encoded = tasks.encode_query.delay(base64.b64encode(_picture(3)).decode(), version.pk).get(timeout=60)
        verifying = tasks.encode_query.delay(base64.b64encode(_picture(3)).decode(), version.pk, True).get(timeout=60)
    assert encoded["keypoints"] is None
    query_keypoints = query_payload.encoding_from_message(verifying).keypoints
    assert query_keypoints is not None
    # They are the photo's own, at the shopper photo's side (a catalog image's are at CATALOG_SIDE: a plain ellipse
    # matched across the two sides is too featureless a test of that).
    own = geometry.extract(Image.open(io.BytesIO(_picture(3))), side=geometry.QUERY_SIDE)
    assert geometry.unpack(query_keypoints).size == own.size
    assert geometry.verify(geometry.unpack(query_keypoints), own).inliers >= len(own) // 2
    assert len(encoded["bits"]) == 32 and set(encoded["bits"]) <= {"0", "1"}
    assert len(encoded["fc7"]) == version.fc7_dim
    assert encoded["category"] in {"dress", "bag"}
    # The query is a catalog image: its code is the stored one, and its fc7 is the nearest.
    stored = ImageEmbedding.objects.get(image__sha256=f"{3:064d}", model_version=version)
    assert stored.code == encoded["bits"]
    nearest = min(
        ImageEmbedding.objects.filter(model_version=version),
        key=lambda e: float(np.linalg.norm(np.asarray(e.fc7) - np.asarray(encoded["fc7"]))),
    )
    assert nearest.pk == stored.pk


@pytest.mark.django_db
def test_a_worker_process_preloads_the_active_encoder(settings, tmp_path):
    from workers import encoders
    from workers.ml.baseline import fit_baseline

    settings.MODELS_DIR = tmp_path
    assert pipelines.encoder_warm_up() is None  # nothing active yet: nothing to load, no error
    images = [Image.open(io.BytesIO(_picture(seed))) for seed in range(4)]
    path = fit_baseline(images, out_path=tmp_path / "v.pt", code_bits=32, fc7_dim=2, input_size=32)
    ModelVersion.objects.create(name="warm", checkpoint=str(path), status=ModelVersion.Status.ACTIVE)
    assert pipelines.encoder_warm_up() == "warm"
    assert path.resolve() in encoders._encoders


@pytest.mark.django_db
def test_the_warm_up_task_a_switch_sends_loads_the_active_encoder(settings, tmp_path):
    from workers import encoders, tasks
    from workers.ml.baseline import fit_baseline

    settings.MODELS_DIR = tmp_path
    images = [Image.open(io.BytesIO(_picture(seed))) for seed in range(4)]
    path = fit_baseline(images, out_path=tmp_path / "switched.pt", code_bits=32, fc7_dim=2, input_size=32)
    ModelVersion.objects.create(name="switched", checkpoint=str(path), status=ModelVersion.Status.ACTIVE)
    encoders._encoders.pop(path.resolve(), None)
    assert tasks.warm_up_search() == {"loaded": "switched"}
    assert path.resolve() in encoders._encoders
