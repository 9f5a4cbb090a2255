"""The shopper's photo encoded in the web process (catalog.query_encoder) on ONNX Runtime, against the real parts:
version 0 fitted on a tiny rendered catalog and exported to ONNX, a real Celery worker for the worker path, the torch
Encoder as the reference. (That a web process running this never loads torch: test_import_boundaries.py.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from catalog import dispatch, geometry, query_encoder, search
from catalog.intake.images import image_validate
from catalog.search import SearchOptions
from catalog.services import model_versions
from inference.localise import encode_with_item
from tests.catalog.fitted import as_sent, fitted_version, photos, png
from tests.ml.ml_helpers import assert_same_bits
from workers.ml.encoder import Encoder as TorchEncoder


@pytest.fixture
def version_zero(settings, tmp_path):
    settings.MODELS_DIR = tmp_path
    return model_versions.model_version_activate(version=fitted_version(tmp_path, name="v0"))


@pytest.mark.django_db(transaction=True)  # the worker reads the version through its own connection
def test_the_in_process_encoder_gives_the_worker_s_codes_fc7_and_keypoints(version_zero, celery_worker_on):
    shots = [query_encoder.query_image(photo) for photo in photos(4, view=1)]  # other views than the fit's

    here = [query_encoder.query_encode(image=shot, version=version_zero, keypoints=True) for shot in shots]
    with celery_worker_on("search"):
        there = [dispatch.encode_query(photo=png(shot), version_id=version_zero.pk, keypoints=True) for shot in shots]

    assert {encoded.encoder for encoded in here} == {"inprocess"}
    assert set(here[0].timings_ms) == {"encode", "keypoints"}
    for encoded, remote in zip(here, there):
        local = encoded.encoding
        assert local.model_version_id == remote.model_version_id == version_zero.pk
        assert local.code.tobytes() == remote.code.tobytes()  # the same ONNX file, the same preprocessing
        assert np.allclose(local.fc7, remote.fc7, atol=1e-6)
        assert local.category == remote.category and local.category_probs == pytest.approx(remote.category_probs)
        assert local.keypoints == remote.keypoints and len(geometry.unpack(local.keypoints)) > 0
    assert len({encoded.encoding.code.tobytes() for encoded in here}) > 1  # the photos are told apart

    # ... and both agree with the torch Encoder on the checkpoint itself (numpy preprocessing, the whole graph)
    checkpoint = version_zero.checkpoint
    reference = TorchEncoder.load(checkpoint).encode(shots)
    local = query_encoder.encoder_for(version_zero).encode(shots)
    assert_same_bits(checkpoint, shots, local, reference)
    assert np.allclose(local.fc7, reference.fc7, atol=1e-5)
    assert np.allclose(np.stack([e.encoding.fc7 for e in here]), reference.fc7, atol=1e-5)


@pytest.mark.django_db(transaction=True)
def test_the_worker_path_still_serves_when_selected_or_when_a_version_has_no_export(
    settings, tmp_path, version_zero, celery_worker_on
):
    photo = photos(1, view=1)[0]
    sent = as_sent(query_encoder.query_image(photo))
    settings.SEARCH_ENCODER = "worker"
    with celery_worker_on("search"):
        remote = search.search_photo(data=png(photo), options=SearchOptions(k=3))
        settings.SEARCH_ENCODER = "inprocess"
        unexported = model_versions.model_version_activate(
            version=fitted_version(tmp_path, name="v0-no-export", seed=3, export=False)
        )
        fallback = query_encoder.query_encode(image=sent, version=unexported)

    assert "keypoints" not in remote.timings_ms and remote.timings_ms["encode"] > 0  # one round trip
    # the worker encoded the small JPEG it was sent, exactly as this process encodes that JPEG
    served_fusion = search.item_fusion_weight(SearchOptions())  # both paths mix in the photo's best item box alike
    expected = query_encoder.query_encode(
        image=sent, version=version_zero, keypoints=True, item_weight=served_fusion
    ).encoding
    assert remote.query.code.tobytes() == expected.code.tobytes() and np.allclose(remote.query.fc7, expected.fc7)
    assert remote.query.keypoints == expected.keypoints is not None
    assert fallback.encoder == "worker"  # no ONNX file yet: a worker encodes (and exports it for next time)
    reference = TorchEncoder.load(unexported.checkpoint).encode([as_sent(sent)])
    assert np.allclose(fallback.encoding.fc7, reference.fc7[0], atol=1e-5)


@pytest.mark.django_db
def test_a_switch_makes_the_web_encoder_use_the_new_version(settings, tmp_path, version_zero):
    photo = photos(1, view=1)[0]
    before = search.search_photo(data=png(photo), options=SearchOptions(k=3, verify=False))
    assert query_encoder.loaded_version() == (version_zero.pk, version_zero.checkpoint)

    newer = model_versions.model_version_activate(version=fitted_version(tmp_path, name="v1", seed=5))
    after = search.search_photo(data=png(photo), options=SearchOptions(k=3, verify=False))

    assert query_encoder.loaded_version() == (newer.pk, newer.checkpoint)
    assert before.version.pk == version_zero.pk and after.version.pk == newer.pk
    assert after.query.model_version_id == newer.pk
    expected, _, _ = encode_with_item(  # the photo and its best item box, as served
        TorchEncoder.load(newer.checkpoint), query_encoder.query_image(photo),
        weight=search.item_fusion_weight(SearchOptions()),
    )  # fmt: skip
    assert after.query.code.tobytes() == expected.codes[0].tobytes()
    assert np.allclose(after.query.fc7, expected.fc7[0], atol=1e-5)


def test_a_large_photo_is_downscaled_once_and_a_small_one_left_alone():
    large = Image.new("RGB", (4000, 3000), (10, 20, 30))
    assert query_encoder.query_image(large).size == (query_encoder.QUERY_MAX_SIDE, 384)
    small = Image.new("RGB", (300, 200))
    assert query_encoder.query_image(small) is small


@pytest.mark.django_db
def test_the_search_s_fast_intake_gives_the_encoding_the_stored_copy_gave(version_zero):
    """search_photo now decodes a phone JPEG at reduced scale and never re-encodes it (intake.image_query): the
    encoding is the one the old route (image_validate's working copy, then query_image) gave, within resampling."""
    encoder = query_encoder.encoder_for(version_zero)
    for photo in photos(4, view=1):
        buffer = io.BytesIO()
        photo.resize((2000, 1500), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=90)
        data = buffer.getvalue()
        before = encoder.encode([query_encoder.query_image(image_validate(data).image)])
        # the whole photo alone: a resampling difference may move the coarse item box by a map cell, and the fused
        # encoding with it (item fusion as served: test_search_items, and the test above)
        result = search.search_photo(data=data, options=SearchOptions(k=3, verify=False, item_fusion=0))
        after = result.query
        assert np.count_nonzero(np.unpackbits(np.bitwise_xor(after.code, before.codes[0]))) <= 2  # of 32 bits
        assert np.linalg.norm(after.fc7 - before.fc7[0]) <= 0.02 * np.linalg.norm(before.fc7[0])
