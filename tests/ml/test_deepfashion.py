import numpy as np
import pytest

from tests.ml.ml_helpers import DEEPFASHION_FIXTURES, DEEPFASHION_INSHOP
from workers.ml.datasets.deepfashion import (
    DeepFashionCategoryAttribute,
    DeepFashionInShop,
    read_list_file,
)
from workers.ml.datasets.render import product_spec, render_product

INSHOP, CATEGORY_ATTRIBUTE = DEEPFASHION_INSHOP, DEEPFASHION_FIXTURES / "category_attribute"


def test_inshop_splits_items_and_categories():
    train = DeepFashionInShop(INSHOP, "train")
    assert train.label_space.categories == ("MEN/Denim", "WOMEN/Blouses_Shirts", "WOMEN/Dresses")
    assert train.label_space.num_landmarks == 8
    assert train.label_space.attributes == ("floral", "denim", "long sleeve")
    assert train[0].attributes.tolist() == [1, 0, 0] and train[2].attributes.tolist() == [0, 0, 1]
    assert train.instance_ids.tolist() == [2, 2, 11]
    query, gallery = DeepFashionInShop(INSHOP, "query"), DeepFashionInShop(INSHOP, "gallery")
    assert query.instance_ids.tolist() == [7] and gallery.instance_ids.tolist() == [7]
    assert len(DeepFashionInShop(INSHOP, None)) == 5
    record = query[0]
    assert record.category == 0 and record.image.mode == "RGB" and record.image.size == (64, 64)
    assert record.extra["split"] == "query" and record.attributes.tolist() == [0, 1, 0]


def test_inshop_landmarks_fill_the_right_slots_with_visibility_from_the_flags():
    train = DeepFashionInShop(INSHOP, "train")
    dress, dress_side, top = train[0], train[1], train[2]
    assert dress.visibility.tolist() == [1] * 8
    assert dress_side.visibility.tolist() == [1, 1, 0, 1, 1, 1, 1, 1]  # flag 1: occluded
    assert top.visibility.tolist() == [1, 1, 1, 1, 0, 0, 1, 1]  # upper body: no waistline
    trousers = DeepFashionInShop(INSHOP, "query")[0]
    assert trousers.visibility.tolist() == [0, 0, 0, 0, 1, 1, 1, 0]  # lower body; flag 2: cut off
    # The fixture was drawn by the renderer: parsed landmarks match its true ones to the pixel.
    seed = next(s for s in range(1000) if product_spec(s).category == "dress")
    truth = render_product(seed, 0, 64).landmarks
    np.testing.assert_allclose(dress.landmarks, truth, atol=0.6 / 64)


def test_inshop_crop_to_bbox_moves_landmarks_into_the_crop():
    full = DeepFashionInShop(INSHOP, "train")[0]
    cropped = DeepFashionInShop(INSHOP, "train", crop_to_bbox=True)[0]
    x0, y0, x1, y1 = np.array(full.extra["bbox"]) * 64
    assert cropped.image.size == (round(x1 - x0), round(y1 - y0))
    expected = (full.landmarks * 64 - [x0, y0]) / [x1 - x0, y1 - y0]
    np.testing.assert_allclose(cropped.landmarks, expected, atol=1e-5)
    assert np.all(cropped.landmarks[cropped.visibility > 0] < 1.0)


def test_category_attribute_benchmark():
    train = DeepFashionCategoryAttribute(CATEGORY_ATTRIBUTE, "train")
    space = train.label_space
    assert space.categories == ("Anorak", "Blouse", "Jeans", "Dress")
    assert space.attributes == ("a-line", "abstract chevron print", "floral", "long sleeve", "striped")
    assert len(train) == 1
    blouse = train[0]
    assert blouse.category == 1 and blouse.attributes.tolist() == [0, 0, 0, 1, 1]
    assert blouse.image.size == (52, 42)  # cropped to its box by default
    assert blouse.visibility.tolist() == [1, 1, 1, 1, 0, 0, 1, 1]
    jeans = DeepFashionCategoryAttribute(CATEGORY_ATTRIBUTE, "val")[0]
    assert jeans.category == 2 and jeans.attributes.tolist() == [0, 0, 0, 0, 0]  # 0 = unknown -> not positive
    assert jeans.visibility.tolist() == [0, 0, 0, 0, 1, 1, 0, 1]
    everything = DeepFashionCategoryAttribute(CATEGORY_ATTRIBUTE, None, crop_to_bbox=False)
    assert everything.instance_ids.tolist() == [0, 1, 2]
    assert everything[2].category == 3 and everything[2].image.size == (64, 64)


def test_list_file_count_must_match(tmp_path):
    path = tmp_path / "list_bbox.txt"
    path.write_text("3\nimage_name x_1 y_1 x_2 y_2\nimg/a.jpg 1 2 3 4\n")
    with pytest.raises(ValueError, match="header says 3 rows"):
        read_list_file(path)
