"""One untrusted image: decoded under caps, turned upright, re-encoded without metadata (what is stored and
encoded), and a shopper's crop box applied to it."""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from catalog.intake import IntakeError

ALLOWED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what phones and catalog exports produce
MAX_IMAGE_BYTES = 15 * 1024 * 1024  # a 48-MP phone JPEG is ~12 MB
MAX_IMAGE_PIXELS = 50_000_000  # beyond this a "photo" is a decompression bomb, not a product shot
MIN_IMAGE_SIDE = 16  # smaller than this carries no product to find
REENCODE_QUALITY = 92  # stored/encoded copies are re-encoded: no metadata, no polyglot payloads survive


@dataclass(frozen=True)
class ValidatedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    data: bytes  # the re-encoded file to store
    extension: str  # of `data`
    sha256: str  # of the original upload: the same file uploaded twice has the same digest
    width: int
    height: int


def image_validate(data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES) -> ValidatedImage:
    if not data:
        raise IntakeError("the image is empty")
    if len(data) > max_bytes:
        raise IntakeError(f"the image is {len(data):,} bytes; the limit is {max_bytes:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            if probe.format not in ALLOWED_FORMATS:
                allowed = ", ".join(sorted(ALLOWED_FORMATS))
                raise IntakeError(f"unsupported image format {probe.format or 'unknown'}; use {allowed}")
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise IntakeError(f"the image has {width * height:,} pixels; the limit is {MAX_IMAGE_PIXELS:,}")
            probe.verify()  # structure check; the object is unusable afterwards, so decode again below
            image = Image.open(io.BytesIO(data))
            image.load()
    except IntakeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise IntakeError("the image is too large when decoded (decompression bomb)") from exc
    except UnidentifiedImageError as exc:
        raise IntakeError("the file is not an image (or is corrupt)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise IntakeError(f"the image could not be decoded: {exc}") from exc

    image_format = image.format or "PNG"
    upright = ImageOps.exif_transpose(image)  # phones store rotation in EXIF; the pixels must be upright
    if min(upright.size) < MIN_IMAGE_SIDE:
        raise IntakeError(f"the image is {upright.width}x{upright.height}; each side must be at least {MIN_IMAGE_SIDE}")
    rgb = upright.convert("RGB")
    output = io.BytesIO()
    if image_format == "PNG":
        rgb.save(output, format="PNG", optimize=False)
    else:
        rgb.save(output, format="JPEG", quality=REENCODE_QUALITY)
    extension = "png" if image_format == "PNG" else "jpg"
    return ValidatedImage(
        image=rgb,
        data=output.getvalue(),
        extension=extension,
        sha256=hashlib.sha256(data).hexdigest(),
        width=rgb.width,
        height=rgb.height,
    )


def crop_box_apply(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Crop to a box given as fractions (x0, y0, x1, y1) of the image, as a browser crop widget reports it."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise IntakeError("the crop box must be x0 < x1 and y0 < y1, all within 0..1")
    pixels = (round(x0 * image.width), round(y0 * image.height), round(x1 * image.width), round(y1 * image.height))
    if min(pixels[2] - pixels[0], pixels[3] - pixels[1]) < MIN_IMAGE_SIDE:
        raise IntakeError("the crop box is too small")
    return image.crop(pixels)
