"""One untrusted image: decoded under caps, turned upright, made the RGB picture it shows (transparency on white,
16-bit scaled to 8, CMYK through its colour profile, the first frame of an animation or a multi-picture JPEG),
re-encoded without metadata at full size (the file that is stored and displayed), downscaled to a working copy
(what is encoded, has its keypoints extracted and is cropped), and a shopper's crop box applied to it.

The working copy's longer side is at most WORK_MAX_SIDE: the network sees 224 px and the verify stage at most 256 px
(catalog.geometry.QUERY_SIDE), so a 12-MP photo (36 MB decoded) becomes at most 3 MB in memory, and an import chunk,
an embedding batch or a query holds working copies, never full-size pictures. `image_downscale` makes one from any
picture and `image_open_downscaled` decodes a stored file straight to one (a JPEG is decoded at reduced scale).

A search stores nothing: `image_query` passes the same checks (one implementation, `_decode_checked`) without the
re-encoded file, and decodes a JPEG at reduced scale, cropped and scaled straight to the query's size.

Every failure, whatever part of the decoder it comes from, is an IntakeError: the caller's 400 or a rejected row.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError

from catalog.intake import IntakeError

# What phones, catalog exports and shop pages produce. MPO is a phone's multi-picture JPEG (its first picture is
# the photo); an animated GIF, WebP or APNG is searched and stored as its first frame.
ALLOWED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "MPO": "jpg", "GIF": "gif"}
MAX_IMAGE_BYTES = 15 * 1024 * 1024  # a 48-MP phone JPEG is ~12 MB
MAX_IMAGE_PIXELS = 50_000_000  # beyond this a "photo" is a decompression bomb, not a product shot
MIN_IMAGE_SIDE = 16  # smaller than this carries no product to find
# The network sees an image letterboxed into a square: past 20:1 the item spans under 12 of its 224 pixels across,
# nothing it can match. Product shots (a belt or a scarf laid out, a panorama of a shelf) stay well under.
MAX_ASPECT_RATIO = 20
# 4x the verify stage's 256 px and 4.6x the network's 224 px: a shopper's crop of a quarter of the photo's width
# still gives the network its full input.
WORK_MAX_SIDE = 1024
REENCODE_QUALITY = 92  # stored/encoded copies are re-encoded: no metadata, no polyglot payloads survive
BACKGROUND = (255, 255, 255)  # what transparent pixels become: shops photograph products on white
_SIXTEEN_BIT_GREY = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_LOSSLESS = {"PNG", "GIF"}  # stored as PNG; the rest as JPEG
_QUARTER_TURNS = (5, 6, 7, 8)  # EXIF orientations that swap width and height (a tuple: `in` never hashes)


@dataclass(frozen=True)
class ValidatedImage:
    image: Image.Image  # RGB, EXIF orientation applied, longer side at most WORK_MAX_SIDE (`image_downscale`)
    data: bytes  # the re-encoded file to store, at full size
    extension: str  # of `data`
    sha256: str  # of the original upload: the same file uploaded twice has the same digest
    width: int  # of the stored file (full size)
    height: int


def image_validate(data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES) -> ValidatedImage:
    """The upload checked, decoded at full size and re-encoded: what storing a picture needs (a product image, a
    golden query). Raises IntakeError."""
    decoded = _decode_checked(data, max_bytes=max_bytes)
    rgb = decoded.image
    lossless = decoded.format in _LOSSLESS
    output = io.BytesIO()
    try:
        if lossless:
            rgb.save(output, format="PNG", optimize=False)
        else:
            rgb.save(output, format="JPEG", quality=REENCODE_QUALITY)
    except Exception as exc:  # noqa: BLE001
        raise IntakeError(f"the image could not be re-encoded: {_reason(exc)}") from exc
    width, height = rgb.size
    return ValidatedImage(
        image=image_downscale(rgb),
        data=output.getvalue(),
        extension="png" if lossless else "jpg",
        sha256=hashlib.sha256(data).hexdigest(),
        width=width,
        height=height,
    )


def image_query(
    data: bytes,
    *,
    box: tuple[float, float, float, float] | None,
    max_side: int,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> Image.Image:
    """A shopper's photo for a search, which stores nothing: the same checks and RGB picture as `image_validate`
    (it refuses exactly what that refuses, crop boxes included) but no re-encoded file, cropped to `box` and scaled
    to at most `max_side`. A JPEG is decoded at the smallest of 1/2, 1/4, 1/8 scale at which the cropped region
    keeps a longer side of `max_side` (or all it has), so a 12-MP photo is mostly decoded at 1/4 and a small crop
    of it at full scale."""
    if box is not None:
        _crop_pixels((1, 1), box)  # a malformed box is refused before anything is decoded
    decoded = _decode_checked(data, max_bytes=max_bytes, keep_side=max_side, box=box)
    image = decoded.image
    if box is not None:
        # The size check is made on the working copy image_validate gives (so the same boxes are refused); the
        # crop itself on the picture decoded here (as many of the region's pixels as max_side can use).
        crop_box_pixels(_downscaled_size(decoded.full_size, WORK_MAX_SIDE), box)
        image = image.crop(_crop_pixels(image.size, box))
    return image_downscale(image, max_side)


def image_downscale(image: Image.Image, max_side: int = WORK_MAX_SIDE) -> Image.Image:
    """`image` scaled so that its longer side is at most `max_side` (aspect ratio kept, never enlarged, mode kept):
    the working copy that encoding, keypoints and crops need. Returns `image` itself when it is small enough, else
    a new picture (antialiased: Pillow first reduces by a whole factor, then resamples with Lanczos)."""
    size = _downscaled_size(image.size, max_side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _downscaled_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    if max(width, height) <= max_side:
        return size
    scale = max_side / max(width, height)
    return (max(1, round(width * scale)), max(1, round(height * scale)))


def image_open_downscaled(data: bytes, max_side: int = WORK_MAX_SIDE) -> Image.Image:
    """A stored (validated, re-encoded) image file as an RGB working copy (`image_downscale`); a JPEG is decoded
    at the smallest of 1/2, 1/4, 1/8 scale that still covers `max_side`, so the full-size picture never exists."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (max_side, max_side))  # JPEG only; other formats ignore it
    return image_downscale(image.convert("RGB"), max_side)


@dataclass(frozen=True)
class _Decoded:
    image: Image.Image  # RGB, upright: full size, or a JPEG decoded at reduced scale (`keep_side`)
    format: str  # the upload's
    full_size: tuple[int, int]  # the upright picture's at full size


def _decode_checked(
    data: bytes,
    *,
    max_bytes: int,
    keep_side: int | None = None,
    box: tuple[float, float, float, float] | None = None,
) -> _Decoded:
    """Every check an upload passes and the RGB picture it shows: the one implementation of intake's rules, for
    the stored copy (`image_validate`) and the search's (`image_query`). With `keep_side`, a JPEG is decoded at
    the smallest DCT scale at which `box`'s region (the whole picture without one) keeps a longer side of
    `keep_side` px, or all it has."""
    if not data:
        raise IntakeError("the image is empty")
    if len(data) > max_bytes:
        raise IntakeError(f"the image is {len(data):,} bytes; the limit is {max_bytes:,}")
    image, full_size = _decode(data, keep_side=keep_side, box=box)
    image_format = image.format or "PNG"
    try:
        if image.getexif().get(ExifTags.Base.Orientation) in _QUARTER_TURNS:  # the full size turns with the pixels
            full_size = (full_size[1], full_size[0])
        upright = ImageOps.exif_transpose(image)  # phones store rotation in EXIF; the pixels must be upright
    except Exception as exc:  # noqa: BLE001  (any decoder failure on untrusted bytes is the caller's 400)
        raise IntakeError(f"the image's EXIF orientation could not be applied: {_reason(exc)}") from exc
    try:
        rgb = _to_rgb(upright)
    except Exception as exc:  # noqa: BLE001
        raise IntakeError(f"the image's colours could not be converted to RGB: {_reason(exc)}") from exc
    return _Decoded(image=rgb, format=image_format, full_size=full_size)


def _decode(
    data: bytes, *, keep_side: int | None, box: tuple[float, float, float, float] | None
) -> tuple[Image.Image, tuple[int, int]]:
    """Open and check the header (format, pixels, sides, aspect) before anything is decoded, then decode the first
    frame only (at reduced scale: `_decode_checked`). Returns the picture and its full size (as stored)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            if probe.format not in ALLOWED_FORMATS:
                allowed = ", ".join(sorted(ALLOWED_FORMATS))
                raise IntakeError(f"unsupported image format {probe.format or 'unknown'}; use {allowed}")
            _header_check(*probe.size)
            probe.verify()  # structure check; the object is unusable afterwards, so decode again below
            image = Image.open(io.BytesIO(data))
            image.seek(0)  # an animation or a multi-picture JPEG: the first frame is the photo
            full_size = image.size
            if keep_side is not None:
                image.draft(None, _draft_size(full_size, keep_side, box))  # JPEG only; other formats ignore it
            image.load()
            return image, full_size
    except IntakeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise IntakeError("the image is too large when decoded (decompression bomb)") from exc
    except UnidentifiedImageError as exc:
        raise IntakeError("the file is not an image (or is corrupt)") from exc
    except MemoryError as exc:
        raise IntakeError("the image is too large to decode") from exc
    except Exception as exc:  # noqa: BLE001  (OSError, SyntaxError, struct.error, EOFError, ... from a decoder)
        raise IntakeError(f"the image could not be decoded: {_reason(exc)}") from exc


def _draft_size(
    size: tuple[int, int], keep_side: int, box: tuple[float, float, float, float] | None
) -> tuple[int, int]:
    """The size to ask `Image.draft` for (it picks the largest scale 1/8..1 that is at least this): the picture
    reduced by the largest whole factor that leaves the box's region a longer side of `keep_side`. The box is in
    upright coordinates and the file's may be turned a quarter: the region's shorter span, taken on the longer
    side, is what it has either way (a conservative bound, never fewer pixels than needed)."""
    width, height = size
    span_x, span_y = (box[2] - box[0], box[3] - box[1]) if box is not None else (1.0, 1.0)
    region = min(max(span_x * width, span_y * height), max(span_x * height, span_y * width))
    factor = max(1, int(region // keep_side))
    return (-(-width // factor), -(-height // factor))


def _header_check(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise IntakeError(f"the image has {width * height:,} pixels; the limit is {MAX_IMAGE_PIXELS:,}")
    if min(width, height) < MIN_IMAGE_SIDE:
        raise IntakeError(f"the image is {width}x{height}; each side must be at least {MIN_IMAGE_SIDE}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise IntakeError(f"the image is {width}x{height}, longer than {MAX_ASPECT_RATIO}:1; crop it to the product")


def _to_rgb(image: Image.Image) -> Image.Image:
    """The RGB picture the file shows: transparency composited on white (not the black that `convert` gives),
    16-bit grey scaled to 8 bits (not clipped), CMYK through its embedded colour profile where it has one."""
    if image.mode in _SIXTEEN_BIT_GREY:
        values = np.asarray(image).astype(np.float32)  # a 16-bit PNG's grey levels, 0..65535
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "CMYK":
        return _cmyk_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # a broken profile: Pillow's own formula below is still a fair picture
    return image.convert("RGB")


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def crop_box_apply(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Crop to a box given as fractions (x0, y0, x1, y1) of the image, as a browser crop widget reports it."""
    return image.crop(crop_box_pixels(image.size, box))


def crop_box_pixels(size: tuple[int, int], box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """The box in pixels of a picture of `size`; refused (IntakeError) when malformed or under MIN_IMAGE_SIDE."""
    pixels = _crop_pixels(size, box)
    if min(pixels[2] - pixels[0], pixels[3] - pixels[1]) < MIN_IMAGE_SIDE:
        raise IntakeError("the crop box is too small")
    return pixels


def _crop_pixels(size: tuple[int, int], box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise IntakeError("the crop box must be x0 < x1 and y0 < y1, all within 0..1")
    width, height = size
    return (round(x0 * width), round(y0 * height), round(x1 * width), round(y1 * height))
