"""A version evaluated on the golden set by a real worker, through the real cascade: the catalog is embedded with
it first, held-out shopper views of the shop's own products and the photos staff added are searched, and the
numbers land on the version."""

import io
import json

import numpy as np
import pytest
from django.core.files.base import ContentFile
from django.core.management import call_command
from django.db import transaction

from catalog.models import ImageEmbedding, ImageKeypoints, ModelVersion, ProductImage, RecentQuery
from catalog.services import golden, model_versions
from tests import factories
from tests.ml.ml_helpers import save_tiny_checkpoint
from tests.waiting import wait_until
from workers import pipelines

PRODUCTS = 12


def _catalog_and_version(tmp_path) -> ModelVersion:
    merchant = factories.merchant()
    for i in range(PRODUCTS):
        product = factories.product(merchant, sku=f"SKU-{i}", category="abc"[i % 3])
        row = ProductImage(product=product, sha256=f"{i:064d}")
        row.file.save(f"p{i}.png", ContentFile(factories.shape_png(i)), save=True)
    hidden = factories.product(merchant, sku="hidden", active=False)
    hidden_image = ProductImage(product=hidden, sha256="f" * 64)
    hidden_image.file.save("hidden.png", ContentFile(factories.shape_png(99)), save=True)
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny.pt", spread_codes=True)
    return ModelVersion.objects.create(
        name="candidate", kind=ModelVersion.Kind.FASHIONNET, status=ModelVersion.Status.READY,
        checkpoint=str(checkpoint), code_bits=32, fc7_dim=32,
    )  # fmt: skip


@pytest.mark.django_db(transaction=True)
def test_a_version_is_evaluated_on_the_golden_set_by_a_real_worker(settings, tmp_path, celery_worker_on):
    settings.MODELS_DIR = tmp_path
    version = _catalog_and_version(tmp_path)
    shopper_photo_of = factories.Product.objects.get(sku="SKU-3")
    # the catalog photo itself: must be found
    golden.golden_query_add(product=shopper_photo_of, photo=factories.shape_png(3))

    with celery_worker_on("train"):
        with transaction.atomic():
            golden.version_evaluate(version=version)
        wait_until(
            lambda: golden.version_golden(ModelVersion.objects.get(pk=version.pk)) is not None, timeout=120,
            interval=0.5, message=lambda: ModelVersion.objects.get(pk=version.pk).metrics,
        )  # fmt: skip

    version.refresh_from_db()
    numbers = golden.version_golden(version)
    assert numbers is not None, version.metrics
    # the catalog was embedded with the version (the hidden product's image too: switching reuses the rows)
    assert ImageEmbedding.objects.filter(model_version=version).count() == PRODUCTS + 1
    assert numbers["queries"] == PRODUCTS + 1  # a held-out view of every visible product, and the admin's photo
    assert numbers["by_source"]["heldout"]["queries"] == PRODUCTS
    assert numbers["by_source"]["admin"] == {**numbers["by_source"]["admin"], "queries": 1, "r1": 1.0}
    assert numbers["by_shop"]["acme"]["queries"] == PRODUCTS + 1
    for key in ("r1", "r10", "map10", "coarse_recall", "final_recall"):
        assert 0.0 <= numbers[key] <= 1.0
    assert numbers["r1"] <= numbers["map10"] <= numbers["r10"] == numbers["final_recall"] <= numbers["coarse_recall"]
    assert numbers["encode_ms_p50"] > 0 and numbers["encode_ms_p95"] >= numbers["encode_ms_p50"]
    calibration = numbers["calibration"]  # the "same product" confidence fitted on this version's results
    assert calibration["results"] >= numbers["queries"] and np.all(np.diff(calibration["confidences"]) <= 0)
    assert numbers["calibration_ece"] == calibration["ece"] and 0.0 <= calibration["ece"] <= 1.0
    assert version.status == ModelVersion.Status.READY  # evaluating never switches
    # the tiny network's 4 landmarks are not the renders' layout: there is nothing to measure its PCK on
    assert numbers["landmarks"] is None and "landmark_pck" not in numbers


@pytest.mark.django_db(transaction=True)  # a version's code index is created outside a test transaction
def test_the_golden_set_is_the_same_for_every_version(settings, tmp_path):
    """Two versions see the same held-out photos of the same products (seeded), so their numbers compare."""
    settings.MODELS_DIR = tmp_path
    first = _catalog_and_version(tmp_path)
    second = ModelVersion.objects.create(
        name="other", kind=ModelVersion.Kind.FASHIONNET, status=ModelVersion.Status.READY,
        checkpoint=str(save_tiny_checkpoint(tmp_path / "other.pt", seed=1, spread_codes=True)), code_bits=32,
        fc7_dim=32,
    )  # fmt: skip
    for version in (first, second):
        pipelines.version_embed_catalog(version=version)
    photos = [pipelines.golden_query_photos(version=version) for version in (first, second)]
    assert [(s, p) for s, p, _, _ in photos[0]] == [(s, p) for s, p, _, _ in photos[1]]
    assert all(a[3] == b[3] for a, b in zip(*photos))
    assert len(photos[0]) == PRODUCTS  # the hidden product is not in the golden set


def test_golden_numbers_count_ranks_and_stages():
    outcomes = [
        {"rank": 1, "coarse": True, "encode_ms": 10.0, "search_ms": 2.0},
        {"rank": 4, "coarse": True, "encode_ms": 20.0, "search_ms": 2.0},
        {"rank": None, "coarse": True, "encode_ms": 30.0, "search_ms": 2.0},
        {"rank": None, "coarse": False, "encode_ms": 40.0, "search_ms": 2.0},
    ]
    numbers = pipelines.golden_numbers(outcomes)
    assert numbers["queries"] == 4 and numbers["r1"] == 0.25 and numbers["r10"] == 0.5
    assert numbers["map10"] == pytest.approx((1 + 0.25) / 4, abs=1e-4)
    assert numbers["coarse_recall"] == 0.75 and numbers["final_recall"] == 0.5
    assert numbers["encode_ms_p50"] == 25.0


@pytest.mark.django_db(transaction=True)
def test_the_evaluate_version_command_prints_and_stores_the_numbers(settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    version = _catalog_and_version(tmp_path)
    out = io.StringIO()
    call_command("evaluate_version", "candidate", stdout=out)
    printed = json.loads(out.getvalue())
    version.refresh_from_db()
    assert printed["version"] == "candidate" and printed["queries"] == PRODUCTS
    assert golden.version_golden(version)["r1"] == printed["r1"]
    # the cascade as served (SEARCH_VERIFY is on by default): the catalog's local features were stored for it
    assert printed["verify"] is True and ImageKeypoints.objects.count() == PRODUCTS + 1
    by_category = printed["by_category"]  # what the compare page shows per category
    assert set(by_category) == {"a", "b", "c"} and sum(n["queries"] for n in by_category.values()) == PRODUCTS
    assert all(0.0 <= n["r1"] <= n["r10"] <= 1.0 for n in by_category.values())


def test_the_match_confidence_is_isotonic_in_the_score_and_calibrated():
    """Synthetic results whose chance of being the product falls with the score: the fitted confidence falls too,
    follows the true rate, and its cross-validated calibration error is small."""
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 2, 4000)
    truth = np.clip(1.2 - scores, 0, 1)  # P(same product) given the score
    scored = [(float(s), bool(rng.random() < p), i // 10) for i, (s, p) in enumerate(zip(scores, truth))]
    calibration = pipelines.match_calibration(scored)
    confidences = np.asarray(calibration["confidences"])
    assert np.all(np.diff(calibration["scores"]) > 0) and np.all(np.diff(confidences) <= 0)
    assert calibration["ece"] < 0.05 and calibration["results"] == 4000
    version = ModelVersion(metrics={"golden": {"r1": 0.5, "calibration": calibration}})
    assert golden.match_confidence(version, 0.1) == pytest.approx(1.0, abs=0.1)
    assert golden.match_confidence(version, 0.9) == pytest.approx(0.3, abs=0.1)
    assert golden.match_label(golden.match_confidence(version, 0.1)) == "exact match"
    assert golden.match_label(golden.match_confidence(version, 1.5)) == "similar"
    assert golden.match_confidence(ModelVersion(metrics={}), 0.1) is None


def test_ties_in_the_score_get_one_confidence():
    """Equal scores (the same distance twice) are pooled: the knots stay strictly increasing for np.interp."""
    scored = [(0.5, i % 2 == 0, i) for i in range(20)] + [(1.0, i % 5 == 0, i) for i in range(20)]
    calibration = pipelines.match_calibration(scored)
    assert calibration["scores"] == [0.5, 1.0] and calibration["confidences"] == [0.5, 0.2]


@pytest.mark.django_db(transaction=True)  # a version's code index is created outside a test transaction
def test_the_top10_overlap_on_recent_queries_compares_the_candidate_with_the_active_version(settings, tmp_path):
    """On the recent-query sample, a candidate with the active version's very network shares its whole top 10 and
    first result; the numbers are stored with the candidate's golden-set numbers."""
    settings.MODELS_DIR = tmp_path
    candidate = _catalog_and_version(tmp_path)
    active = ModelVersion.objects.create(
        name="active", kind=ModelVersion.Kind.FASHIONNET, status=ModelVersion.Status.READY,
        checkpoint=candidate.checkpoint, code_bits=32, fc7_dim=32,
    )  # fmt: skip
    for version in (candidate, active):
        pipelines.version_embed_catalog(version=version)
    model_versions.model_version_activate(version=active)
    assert pipelines.recent_overlap(version=candidate) is None  # no sample yet
    merchant = factories.Merchant.objects.get(slug="acme")
    for seed in (1, 4, 7):
        query = RecentQuery(merchant=merchant if seed != 7 else None)
        query.photo.save("q.png", ContentFile(factories.shape_png(seed)), save=True)

    overlap = pipelines.recent_overlap(version=candidate)

    assert overlap == {"against": "active", "against_id": active.pk, "queries": 3, "overlap10": 1.0, "same_top1": 1.0}
    assert pipelines.recent_overlap(version=active) is None  # the active version is compared with no one
    other = ModelVersion.objects.create(
        name="other", kind=ModelVersion.Kind.FASHIONNET, status=ModelVersion.Status.READY,
        checkpoint=str(save_tiny_checkpoint(tmp_path / "other.pt", seed=5, spread_codes=True)), code_bits=32,
        fc7_dim=32,
    )  # fmt: skip
    numbers = pipelines.version_evaluate_golden(version_id=other.pk)
    assert numbers["recent_overlap"]["queries"] == 3 and 0.0 <= numbers["recent_overlap"]["overlap10"] <= 1.0
