"""Untrusted images: allowlist, caps, bombs, EXIF orientation, re-encoding, crop boxes."""

import io

import pytest
from PIL import Image

from catalog.intake import IntakeError
from catalog.intake.images import crop_box_apply, image_validate


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
        (encode(Image.new("RGB", (40, 30)), "GIF"), "unsupported image format GIF"),
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
