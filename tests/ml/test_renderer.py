import numpy as np
import pytest
from PIL import ImageFilter

from workers.ml.datasets.render import (
    CATEGORIES,
    LABEL_SPACE,
    RenderedProducts,
    attribute_vector,
    product_spec,
    render_product,
)


def test_render_is_deterministic_from_the_seed():
    a, b = render_product(7), render_product(7)
    assert a.image.tobytes() == b.image.tobytes()
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    assert render_product(8).image.tobytes() != a.image.tobytes()
    assert render_product(7, view=1).image.tobytes() != a.image.tobytes()


def test_record_labels_match_the_spec():
    record = render_product(11, size=96)
    spec = product_spec(11)
    assert record.image.size == (96, 96) and record.image.mode == "RGB"
    assert record.instance_id == 11
    assert CATEGORIES[record.category] == spec.category
    np.testing.assert_array_equal(record.attributes, attribute_vector(spec.attribute_names))
    assert record.attributes.shape == (len(LABEL_SPACE.attributes),)
    assert record.landmarks.shape == (8, 2) and record.visibility.shape == (8,)
    assert record.extra["title"] == spec.title


@pytest.mark.parametrize("view", [0, 2])
def test_visible_landmarks_lie_on_the_drawn_item(view):
    seen_categories = set()
    for seed in range(60):
        record = render_product(seed, view=view)
        seen_categories.add(record.category)
        # Landmarks sit on the item's outline: allow a couple of pixels around the mask.
        mask = np.asarray(record.extra["mask"].filter(ImageFilter.MaxFilter(5))) > 0
        x0, y0, x1, y1 = record.extra["bbox"]
        margin = 2.5 / record.image.width
        for (x, y), visible in zip(record.landmarks, record.visibility):
            if not visible:
                assert (x, y) == (0.0, 0.0)
                continue
            assert x0 - margin <= x <= x1 + margin and y0 - margin <= y <= y1 + margin
            assert mask[int(y * mask.shape[0]), int(x * mask.shape[1])], (seed, x, y)
    assert seen_categories == set(range(len(CATEGORIES)))


def test_products_of_one_category_are_visually_distinct():
    seeds = [s for s in range(400) if product_spec(s).category == "top"][:25]
    pixels = [np.asarray(render_product(s, size=64).image, dtype=np.float32) for s in seeds]
    differences = [np.abs(a - b).mean() for i, a in enumerate(pixels) for b in pixels[i + 1 :]]
    assert min(differences) > 3.0


def test_rendered_products_indexing():
    dataset = RenderedProducts(5, views_per_product=3, size=48, split="eval")
    assert len(dataset) == 15
    assert dataset[4].instance_id == dataset.first_seed + 1 and dataset[4].extra["view"] == 1
    np.testing.assert_array_equal(dataset.instance_ids, [r.instance_id for r in dataset])
    train = RenderedProducts(5)
    assert set(train.instance_ids).isdisjoint(dataset.instance_ids)
