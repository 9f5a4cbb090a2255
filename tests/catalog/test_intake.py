"""Untrusted images: allowlist, caps, bombs, EXIF orientation, re-encoding, crop boxes."""

import io

import numpy as np
import pytest
from PIL import Image

from catalog.intake import IntakeError
from catalog.intake.images import _draft_size, crop_box_apply, image_downscale, image_query, image_validate
from catalog.management.commands import bench_intake_memory


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_allowed_formats_are_accepted_and_reencoded(fmt):
    validated = image_validate(encode(Image.new("RGB", (40, 30), (10, 200, 30)), fmt))
    assert (validated.width, validated.height) == (40, 30)
    assert validated.image.mode == "RGB"
    reopened = Image.open(io.BytesIO(validated.data))
    assert reopened.format in {"JPEG", "PNG"} and reopened.size == (40, 30)
    assert len(validated.sha256) == 64


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"not an image at all", "not an image"),
        (encode(Image.new("RGB", (40, 30)), "TIFF"), "unsupported image format TIFF"),
        (encode(Image.new("RGB", (40, 30)), "BMP"), "unsupported image format BMP"),
        (encode(Image.new("RGB", (8, 8)), "PNG"), "at least 16"),
    ],
)
def test_unusable_input_gets_a_clear_error(data, message):
    with pytest.raises(IntakeError, match=message):
        image_validate(data)


def test_truncated_file_is_rejected():
    data = encode(Image.new("RGB", (200, 200), (1, 2, 3)), "JPEG")
    with pytest.raises(IntakeError):
        image_validate(data[: len(data) // 2])


def test_byte_cap():
    with pytest.raises(IntakeError, match="limit is 10$"):
        image_validate(encode(Image.new("RGB", (40, 30)), "PNG"), max_bytes=10)


@pytest.mark.parametrize(
    ("side", "message"),
    [
        (8_000, "64,000,000 pixels; the limit is 50,000,000"),  # over our cap, under Pillow's own
        (10_000, "decompression bomb"),  # over Pillow's cap too
    ],
)
def test_decompression_bomb_is_rejected_before_decoding(side, message):
    # A tiny PNG of one colour that decodes to tens of megapixels.
    bomb = encode(Image.new("1", (side, side)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(IntakeError, match=message):
        image_validate(bomb)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    validated = image_validate(encode(image, "JPEG", exif=exif))
    assert (validated.width, validated.height) == (20, 60)


def test_crop_box():
    image = Image.new("RGB", (100, 50))
    assert crop_box_apply(image, (0.25, 0.0, 0.75, 1.0)).size == (50, 50)
    for bad in [(0.5, 0.0, 0.4, 1.0), (-0.1, 0, 1, 1), (0, 0, 1.2, 1), (0, 0, 0.05, 0.05)]:
        with pytest.raises(IntakeError):
            crop_box_apply(image, bad)


# --- odd but legitimate input: what the photo shows is what is stored and searched -----------------------------
WHITE, BLUE = (255, 255, 255), (0, 0, 255)


def cut_out() -> Image.Image:
    """A product cut-out: a blue square on a fully transparent (black) background."""
    image = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (10, 10, 30, 30))
    return image


@pytest.mark.parametrize(
    ("data", "extension"),
    [
        (encode(cut_out(), "PNG"), "png"),
        (encode(cut_out(), "WEBP", lossless=True), "jpg"),
        (encode(cut_out().convert("P"), "PNG"), "png"),  # palette + transparency
    ],
    ids=["png-rgba", "webp-rgba", "png-palette-transparency"],
)
def test_transparency_is_composited_on_white_not_black(data, extension):
    validated = image_validate(data)
    assert validated.image.mode == "RGB" and validated.extension == extension
    assert validated.image.getpixel((1, 1)) == WHITE
    assert validated.image.getpixel((20, 20)) == BLUE


def test_grey_with_alpha_is_composited_on_white():
    image = Image.new("LA", (40, 40), (0, 0))  # black, fully transparent
    image.paste((30, 255), (10, 10, 30, 30))
    validated = image_validate(encode(image, "PNG"))
    assert validated.image.getpixel((1, 1)) == WHITE and validated.image.getpixel((20, 20)) == (30, 30, 30)


def test_sixteen_bit_grey_is_scaled_to_eight_bits_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = np.asarray(image_validate(data).image)[..., 0]
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255 and pixels[32, 32] in range(125, 135)
    assert len(np.unique(pixels)) > 200  # a ramp, not a clipped block of white


def test_cmyk_is_converted_to_the_colours_it_shows():
    validated = image_validate(encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG"))  # pure red ink
    red, green, blue = validated.image.getpixel((20, 20))
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "MPO"])
def test_animations_and_multi_picture_jpegs_give_their_first_frame(fmt):
    first, second = Image.new("RGB", (40, 40), (0, 200, 0)), Image.new("RGB", (40, 40), (200, 0, 0))
    data = encode(first, fmt, save_all=True, append_images=[second])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    validated = image_validate(data)
    red, green, _ = validated.image.getpixel((20, 20))
    assert green > 150 and red < 50
    assert Image.open(io.BytesIO(validated.data)).format in {"JPEG", "PNG"}  # one still picture is stored


@pytest.mark.parametrize(("size", "accepted"), [((16, 320), True), ((16, 336), False), ((400, 20), True)])
def test_extreme_aspect_ratios_past_20_to_1_are_refused_from_the_header(size, accepted):
    data = encode(Image.new("RGB", size, (0, 200, 0)), "PNG")
    if accepted:
        assert image_validate(data).image.size == size
    else:
        with pytest.raises(IntakeError, match="longer than 20:1; crop it to the product"):
            image_validate(data)


def test_decoder_exif_and_colour_failures_are_intake_errors(monkeypatch):
    from PIL import ImageOps

    data = encode(Image.new("RGB", (40, 30)), "JPEG")

    def broken(*args, **kwargs):
        raise TypeError("bad EXIF")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    with pytest.raises(IntakeError, match="EXIF orientation could not be applied: bad EXIF"):
        image_validate(data)


# --- the search's fast path (image_query): the same checks, no re-encoded file, a JPEG decoded at reduced scale --
QUERY_SIDE = 512


def phone_photo(size: tuple[int, int], **save) -> bytes:
    return bench_intake_memory.phone_photo(0, *size, **save)


def the_search_before(data: bytes, box=None) -> Image.Image:
    """What search_photo did before the fast path: the stored copy's working copy, cropped, scaled to 512 px."""
    working = image_validate(data).image
    return image_downscale(working if box is None else crop_box_apply(working, box), QUERY_SIDE)


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@pytest.mark.parametrize("orientation", [1, 6, 8])
@pytest.mark.parametrize("box", [None, (0.1, 0.2, 0.8, 0.9)])
def test_the_fast_path_gives_the_picture_the_search_got_before(orientation, box):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = phone_photo((2400, 1800), exif=exif)

    fast, before = image_query(data, box=box, max_side=QUERY_SIDE), the_search_before(data, box)

    assert fast.mode == "RGB" and max(fast.size) == QUERY_SIDE
    # a crop's pixel edges are rounded on another grid: a pixel more or less; then other resampling, the same picture
    assert all(abs(a - b) <= 1 for a, b in zip(fast.size, before.size))
    assert mean_difference(fast.resize(before.size), before) < 2.0  # of 255


def test_a_jpeg_is_decoded_at_the_reduced_scale_the_query_side_allows():
    photo = Image.open(io.BytesIO(phone_photo((4032, 3024))))
    photo.draft(None, _draft_size(photo.size, QUERY_SIDE, None))
    assert photo.size == (1008, 756)  # a quarter: still twice the query side
    assert _draft_size((4032, 3024), QUERY_SIDE, (0.4, 0.4, 0.5, 0.5)) == (4032, 3024)  # a 403-px region: all of it


def test_a_small_crop_of_a_large_photo_keeps_the_pixels_the_query_needs():
    data = phone_photo((4000, 3000))
    # a tenth of the photo across: the old route cropped the 1,024-px working copy (102 px); this decodes enough
    assert image_query(data, box=(0.4, 0.4, 0.5, 0.5), max_side=QUERY_SIDE).size == (400, 300)
    assert the_search_before(data, (0.4, 0.4, 0.5, 0.5)).size == (102, 77)
    assert image_query(data, box=(0.0, 0.0, 0.25, 0.25), max_side=QUERY_SIDE).size == (512, 384)


@pytest.mark.parametrize(
    "data",
    [encode(cut_out(), "PNG"), encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")],
    ids=["png-rgba", "cmyk"],
)
def test_the_fast_path_converts_colours_by_the_same_rules(data):
    assert np.array_equal(np.asarray(image_query(data, box=None, max_side=QUERY_SIDE)), the_search_before(data))


def test_the_fast_path_refuses_the_crop_boxes_the_working_copy_refuses():
    data = phone_photo((2000, 1000))  # working copy 1024 x 512: 16 px is 1/64 across, 1/32 down
    for box in [(0.5, 0.0, 0.4, 1.0), (-0.1, 0, 1, 1), (0, 0, 1.2, 1), (0, 0, 0.015, 0.5), (0, 0, 0.5, 0.03)]:
        with pytest.raises(IntakeError) as before:
            the_search_before(data, box)
        with pytest.raises(IntakeError, match=str(before.value)):
            image_query(data, box=box, max_side=QUERY_SIDE)
    assert image_query(data, box=(0, 0, 0.016, 0.5), max_side=QUERY_SIDE).size == (32, 500)  # 16 px at 1024, 32 here
