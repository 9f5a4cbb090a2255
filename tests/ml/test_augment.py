import numpy as np
from PIL import Image

from workers.ml.augment import (
    LANDMARK_FLIP_PAIRS,
    MIN_AUGMENT_SIZE,
    AugmentStrength,
    estimate_item_mask,
    horizontal_flip,
    random_background,
    shopper_view,
    translation,
    warp_record,
)
from workers.ml.datasets.render import render_product
from workers.ml.records import Record


def _flip(record: Record) -> Record:
    """Mirror a record left-right as shopper_view's flip does: left/right landmark slots swapped (8-slot layout)."""
    pairs = LANDMARK_FLIP_PAIRS if record.landmarks is not None and len(record.landmarks) == 8 else ()
    return warp_record(record, horizontal_flip(record.image.width), swap_pairs=pairs)


def _dot_record() -> Record:
    """A 100x100 grey image with one white pixel block and landmarks at known places."""
    pixels = np.full((100, 100, 3), 128, np.uint8)
    pixels[50, 20] = 255
    landmarks = np.array([[0.205, 0.505], [0.95, 0.5], [0.1, 0.9]] + [[0.5, 0.5]] * 5, np.float32)
    return Record(
        image=Image.fromarray(pixels),
        instance_id=3,
        category=1,
        landmarks=landmarks,
        visibility=np.array([1, 1, 0, 1, 1, 1, 1, 1], np.float32),
    )


def test_translation_moves_pixels_and_landmarks_together_and_hides_points_leaving_the_frame():
    moved = warp_record(_dot_record(), translation(10, 0))
    pixels = np.asarray(moved.image)
    assert tuple(pixels[50, 30]) == (255, 255, 255) and tuple(pixels[50, 20]) == (128, 128, 128)
    np.testing.assert_allclose(moved.landmarks[0], [0.305, 0.505], atol=1e-6)
    np.testing.assert_allclose(moved.landmarks[1], [1.05, 0.5], atol=1e-6)
    assert moved.visibility[:3].tolist() == [1, 0, 0]  # out of frame; already invisible stays so
    assert moved.instance_id == 3 and moved.category == 1


def test_horizontal_flip_mirrors_landmarks_and_swaps_left_and_right():
    record = _dot_record()
    flipped = _flip(record)
    assert tuple(np.asarray(flipped.image)[50, 79]) == (255, 255, 255)
    expected = record.landmarks.copy()
    expected[:, 0] = 1.0 - expected[:, 0]
    for left, right in [(0, 1), (2, 3), (4, 5), (6, 7)]:
        expected[[left, right]] = expected[[right, left]]
    np.testing.assert_allclose(flipped.landmarks, expected, atol=1e-6)
    assert flipped.visibility[:4].tolist() == [1, 1, 1, 0]
    np.testing.assert_allclose(flipped.landmarks[1], [1 - 0.205, 0.505], atol=1e-6)


def test_shopper_view_is_deterministic_and_keeps_the_labels():
    record = render_product(5)
    a, b = shopper_view(record, 42, "query"), shopper_view(record, 42, "query")
    assert a.image.tobytes() == b.image.tobytes()
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    assert shopper_view(record, 43, "query").image.tobytes() != a.image.tobytes()
    assert a.instance_id == record.instance_id and a.category == record.category
    np.testing.assert_array_equal(a.attributes, record.attributes)
    assert record.image.size == (128, 128) and record.extra["view"] == 0  # source untouched


def test_visible_landmarks_stay_on_the_item_after_strong_views():
    for seed in range(30):
        view = shopper_view(render_product(seed), seed, "strong")
        mask = np.asarray(view.extra["mask"])
        visible = view.visibility > 0
        assert np.all((view.landmarks[visible] >= 0) & (view.landmarks[visible] < 1))
        for x, y in view.landmarks[visible]:
            # Within 3 px of the warped item mask (landmarks lie on outlines).
            ys, xs = int(y * mask.shape[0]), int(x * mask.shape[1])
            assert mask[max(ys - 3, 0) : ys + 4, max(xs - 3, 0) : xs + 4].max() > 0


def test_occlusion_hides_the_landmarks_it_covers():
    occlude_only = AugmentStrength("occlude", occlusion_probability=1.0, occlusion_area=(0.3, 0.5))
    hidden = 0
    for seed in range(40):
        record = render_product(seed)
        view = shopper_view(record, seed, occlude_only)
        np.testing.assert_allclose(view.landmarks, record.landmarks)  # no geometry in this strength
        newly_hidden = (record.visibility > 0) & (view.visibility == 0)
        source, target = np.asarray(record.image, int), np.asarray(view.image, int)
        for x, y in view.landmarks[newly_hidden]:
            px, py = int(x * 128), int(y * 128)
            assert np.abs(source[py, px] - target[py, px]).sum() > 0  # the occluder is drawn there
        hidden += int(newly_hidden.sum())
    assert hidden > 0


def test_records_without_landmarks_and_small_images_work():
    record = Record(image=Image.new("L", (28, 28), 90).convert("RGB"), instance_id=1, category=2)
    view = shopper_view(record, 0, "query")
    assert view.landmarks is None and view.image.mode == "RGB"
    assert min(view.image.size) == MIN_AUGMENT_SIZE
    assert shopper_view(record, 0, "none").image.size == (28, 28)


def test_item_mask_is_estimated_on_a_studio_backdrop_only():
    record = render_product(9)
    estimated = np.asarray(estimate_item_mask(record.image)) > 127
    truth = np.asarray(record.extra["mask"]) > 127
    assert (estimated == truth).mean() > 0.95
    busy = random_background((96, 96), 0, "clutter")
    assert estimate_item_mask(busy) is None
    assert estimate_item_mask(Image.new("RGB", (50, 50), "white")) is None  # nothing on the backdrop
