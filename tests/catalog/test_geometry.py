"""catalog.geometry: local features packed compactly, and RANSAC inliers that tell the same object from a look-alike."""

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from catalog import geometry


def product_photo(seed: int, side: int = 400) -> Image.Image:
    """A catalog-style product shot: an item of a random outline, printed with a product-specific pattern (smooth
    random blotches and a few shapes), on a white background."""
    rng = np.random.default_rng(seed)
    corners = [(0.08, 0.25, 0.08, 0.25), (0.75, 0.92, 0.08, 0.25), (0.75, 0.92, 0.75, 0.92), (0.08, 0.25, 0.75, 0.92)]
    outline = [(side * rng.uniform(x0, x1), side * rng.uniform(y0, y1)) for x0, x1, y0, y1 in corners]
    mask = Image.new("L", (side, side), 0)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    noise = cv2.GaussianBlur(rng.standard_normal((side, side, 3)).astype(np.float32), (0, 0), 4.0)
    pattern = np.clip(128 + noise * (90 / noise.std()), 0, 255).astype(np.uint8)
    item = Image.fromarray(pattern)
    draw = ImageDraw.Draw(item)
    for _ in range(25):
        x, y = rng.uniform(side * 0.2, side * 0.8, 2)
        r = rng.uniform(5, 20)
        draw.ellipse(
            [x - r, y - r, x + r, y + r * rng.uniform(0.5, 1.5)], fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
    image = Image.new("RGB", (side, side), (250, 250, 250))
    image.paste(item, mask=mask)
    return image


def warped(image: Image.Image, *, seed: int) -> Image.Image:
    """The same object seen from elsewhere: a perspective warp, smaller in the frame, on a grey textured surface."""
    rng = np.random.default_rng(seed)
    side = image.width
    corners = np.float32([[0, 0], [side, 0], [side, side], [0, side]])
    moved = corners * 0.7 + side * 0.15 + rng.uniform(-side * 0.06, side * 0.06, (4, 2)).astype(np.float32)
    matrix = cv2.getPerspectiveTransform(corners, moved)
    surface = rng.integers(90, 140, (side, side, 3)).astype(np.uint8)
    out = cv2.warpPerspective(np.asarray(image), matrix, (side, side), borderMode=cv2.BORDER_TRANSPARENT, dst=surface)
    return Image.fromarray(out)


def test_pack_unpack_round_trip_and_size():
    features = geometry.extract(product_photo(1), side=geometry.CATALOG_SIDE)
    assert 20 <= len(features) <= geometry.MAX_FEATURES
    packed = geometry.pack(features)
    assert len(packed) == 10 + 132 * len(features)  # 10-byte header, x and y (float16), 128-byte descriptor
    back = geometry.unpack(packed)
    assert back.size == features.size and max(back.size) == geometry.CATALOG_SIDE
    np.testing.assert_array_equal(back.descriptors, features.descriptors)
    np.testing.assert_allclose(back.xy, features.xy, atol=0.25)  # float16 at <= 320 px: a quarter pixel at worst


def test_uint8_descriptors_are_sift_s_own_values():
    grey = geometry.working_grey(product_photo(2), geometry.QUERY_SIDE)
    _, raw = cv2.SIFT.create(nfeatures=geometry.MAX_FEATURES).detectAndCompute(grey, None)
    assert raw.min() >= 0 and raw.max() <= 255 and np.array_equal(raw, np.rint(raw))  # so uint8 loses nothing


def test_a_blank_image_packs_to_no_features():
    features = geometry.extract(Image.new("RGB", (100, 60), (255, 255, 255)), side=geometry.CATALOG_SIDE)
    assert len(features) == 0
    back = geometry.unpack(geometry.pack(features))
    assert len(back) == 0 and geometry.verify(back, back) == geometry.Verification(0, 0)


def test_unpack_refuses_what_is_not_packed_features():
    packed = geometry.pack(geometry.extract(product_photo(3), side=geometry.CATALOG_SIDE))
    with pytest.raises(ValueError):
        geometry.unpack(b"XX" + packed[2:])
    with pytest.raises(ValueError):
        geometry.unpack(packed[:-1])
    with pytest.raises(ValueError):
        geometry.unpack(b"KP")


def test_the_same_product_seen_from_elsewhere_has_many_inliers_another_product_few():
    catalog = [geometry.extract(product_photo(seed), side=geometry.CATALOG_SIDE) for seed in range(10, 16)]
    query = geometry.extract(warped(product_photo(10), seed=0), side=geometry.QUERY_SIDE)

    same, *others = geometry.verify_many(query, catalog)

    assert same is not None and same.inliers >= 40, same
    assert all(other is not None and other.inliers <= 6 for other in others), others
    assert geometry.verify_many(query, [None]) == [None]  # no stored features: not verified


def test_root_sift_compares_histograms_by_hellinger_distance():
    rng = np.random.default_rng(0)
    descriptors = rng.integers(0, 120, (5, geometry.DESCRIPTOR_BYTES)).astype(np.uint8)
    descriptors[4] = 0  # a descriptor of a blank patch: stays zeros, not NaN
    rooted = geometry.root_sift(descriptors)

    assert rooted.dtype == np.float32 and rooted.shape == descriptors.shape
    np.testing.assert_allclose(np.linalg.norm(rooted[:4], axis=1), 1.0, rtol=1e-6)  # unit length: sqrt of an L1 unit
    assert not rooted[4].any()
    # squared Euclidean distance = 2 - 2 x the Bhattacharyya coefficient of the two normalised histograms
    p, q = (descriptors[i] / descriptors[i].sum() for i in (0, 1))
    assert np.sum((rooted[0] - rooted[1]) ** 2) == pytest.approx(2 - 2 * np.sum(np.sqrt(p * q)), rel=1e-5)
    # a descriptor and the same histogram at another scale (another contrast) are the same point
    even = (descriptors[:1] // 2 * 2).astype(np.uint8)
    np.testing.assert_allclose(geometry.root_sift(even), geometry.root_sift(even // 2), atol=1e-6)


@pytest.mark.parametrize("stored_side", [geometry.CATALOG_SIDE, geometry.QUERY_SIDE, 320])
def test_catalog_features_stored_at_any_side_verify_the_same_product(stored_side):
    # Rows written before CATALOG_SIDE changed keep their side (in the packed header): RANSAC's tolerance follows it.
    stored = geometry.unpack(geometry.pack(geometry.extract(product_photo(10), side=stored_side)))
    other = geometry.unpack(geometry.pack(geometry.extract(product_photo(11), side=stored_side)))
    query = geometry.extract(warped(product_photo(10), seed=0), side=geometry.QUERY_SIDE)

    same, different = geometry.verify_many(query, [stored, other])

    assert same is not None and same.inliers >= 30, same
    assert different is not None and different.inliers <= 6, different
