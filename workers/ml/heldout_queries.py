"""Held-out shopper photos: the evaluation queries, made by code that training never runs.

Training makes its positives with `workers.ml.augment.shopper_view`. Queries made by the same code measure how
well a network undoes distortions it was trained on, not how it fares on a shopper's photo. This module shares no
code and no parameters with `augment` (a test checks neither imports the other, and that no training module
imports this one), and uses distortion families training never applies:

- the product lies on a real surface: a crop of a real photo (`real_photos.background_photos`) when those are
  on the machine, else a procedural wood, tile, fabric or stone surface (training draws smooth colour noise);
- it is small in the frame (a third to two thirds of its side) and seen through a camera tilted in 3-D (a
  homography from rotations about the x and y axes), which foreshortens it far more than training's corner jitter;
- another catalog product lies across part of it (training occludes with plain blobs), and it casts a shadow;
- light comes from one side (a brightness ramp and a vignette), the white balance is a colour temperature
  between tungsten and shade, and the exposure is off (a gamma);
- the camera shakes (a motion-blur streak), the sensor adds shot noise that grows with brightness and coarse
  chroma noise, the phone downsamples, and the file is JPEG-compressed twice at two qualities on shifted grids.

`heldout_query(image, rng, ...)` makes one photo from a catalog image (RGB, the product on a light backdrop; an
"L" mask marking the product is used when given). Deterministic for a given seed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps


@dataclass(frozen=True)
class HeldoutStrength:
    """Ranges of each held-out distortion (its own parameters: nothing here is shared with training)."""

    name: str
    canvas: int = 256  # side of the photo, px
    item_fraction: tuple[float, float] = (0.4, 0.75)  # the product's longer side, as a fraction of the frame
    tilt_degrees: float = 30.0  # max camera rotation about the x and about the y axis
    roll_degrees: float = 20.0  # max in-plane rotation
    focal: float = 1.2  # focal length in frame widths: shorter exaggerates perspective
    off_centre: float = 0.12  # std of the product's offset from the centre, fraction of the frame
    real_background_probability: float = 0.7  # a real photo under the product when real photos are at hand
    product_occlusion_probability: float = 0.4
    product_occlusion_overlap: tuple[float, float] = (0.1, 0.3)  # of the item's box
    shadow_probability: float = 0.6
    side_light: float = 0.35  # max brightness difference across the frame
    vignette: float = 0.3
    kelvin: tuple[float, float] = (2800.0, 9000.0)
    gamma: tuple[float, float] = (0.75, 1.35)
    motion_blur_probability: float = 0.35
    motion_blur_px: tuple[int, int] = (2, 7)
    shot_noise: float = 0.04  # std of shot noise at full white, fraction of 255
    chroma_noise: float = 5.0  # std of coarse colour noise, 0..255
    downsample: tuple[float, float] = (0.45, 0.9)
    jpeg_first: tuple[int, int] = (80, 95)
    jpeg_second: tuple[int, int] = (35, 70)


HELDOUT = HeldoutStrength("heldout")
HELDOUT_MILD = HeldoutStrength(
    "heldout-mild",
    item_fraction=(0.5, 0.8),
    tilt_degrees=15.0,
    roll_degrees=8.0,
    focal=2.0,
    off_centre=0.06,
    product_occlusion_probability=0.15,
    product_occlusion_overlap=(0.05, 0.15),
    side_light=0.2,
    vignette=0.15,
    kelvin=(4000.0, 7500.0),
    gamma=(0.9, 1.15),
    motion_blur_probability=0.15,
    motion_blur_px=(2, 4),
    shot_noise=0.02,
    chroma_noise=2.0,
    downsample=(0.7, 1.0),
    jpeg_first=(85, 95),
    jpeg_second=(60, 85),
)
HELDOUT_STRENGTHS: dict[str, HeldoutStrength] = {s.name: s for s in (HELDOUT, HELDOUT_MILD)}

LIGHT_BACKDROP_DISTANCE = 40.0  # colour distance from the border colour beyond which a pixel is the product
MASK_SIDE = 96  # the product mask is estimated on a copy this size, then scaled back


def heldout_query(
    image: Image.Image,
    rng: np.random.Generator | int,
    *,
    mask: Image.Image | None = None,
    occluders: Sequence[Image.Image] = (),
    backgrounds: Sequence[Image.Image] = (),
    strength: HeldoutStrength | str = HELDOUT,
) -> Image.Image:
    """A shopper's photo of the product in `image` (RGB, `strength.canvas` square)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    strength = HELDOUT_STRENGTHS[strength] if isinstance(strength, str) else strength
    side = strength.canvas
    image = image.convert("RGB")
    mask = mask.convert("L").resize(image.size) if mask is not None else product_mask(image)
    item, item_mask = _cut_out(image, mask)

    if backgrounds and rng.random() < strength.real_background_probability:
        photo = _real_surface(backgrounds[int(rng.integers(len(backgrounds)))], side, rng)
    else:
        photo = procedural_surface(side, rng)

    longer = max(item.size)
    scale = rng.uniform(*strength.item_fraction) * side / longer
    item_size = (max(8, round(item.width * scale)), max(8, round(item.height * scale)))
    item = item.resize(item_size, Image.Resampling.LANCZOS)
    item_mask = item_mask.resize(item_size, Image.Resampling.BILINEAR)
    item, item_mask = _tilt(item, item_mask, strength, rng)
    if max(item.size) > side:  # the tilt can enlarge it past the frame: a shopper steps back
        fit = side / max(item.size)
        item_size = (max(8, round(item.width * fit)), max(8, round(item.height * fit)))
        item, item_mask = item.resize(item_size, Image.Resampling.LANCZOS), item_mask.resize(item_size)
    # Shoppers aim at the product: off centre by a little, at most a tenth of it outside the photo.
    x, y = (
        int(np.clip((side - extent) / 2 + rng.normal(0, strength.off_centre) * side, -extent / 10, side - extent * 0.9))
        for extent in item.size
    )
    if rng.random() < strength.shadow_probability:
        _cast_shadow(photo, item_mask, (x, y), rng)
    photo.paste(item, (x, y), item_mask)
    if occluders and rng.random() < strength.product_occlusion_probability:
        other = occluders[int(rng.integers(len(occluders)))].convert("RGB")
        _lay_across(photo, other, (x, y, x + item.width, y + item.height), strength, rng)

    photo = _light(photo, strength, rng)
    photo = _sensor(photo, strength, rng)
    return _phone_file(photo, strength, rng)


def product_mask(image: Image.Image) -> Image.Image:
    """The product on a light plain backdrop: pixels far from the border colour, closed and smoothed."""
    small = np.asarray(image.convert("RGB").resize((MASK_SIDE, MASK_SIDE), Image.Resampling.BILINEAR), np.float32)
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    backdrop = np.median(border, axis=0)
    far = np.linalg.norm(small - backdrop, axis=2) > LIGHT_BACKDROP_DISTANCE
    if far.mean() < 0.02:  # no plain backdrop to tell the product from: the whole photo is the product
        return Image.new("L", image.size, 255)
    mask = (
        Image.fromarray((far * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(5)).filter(ImageFilter.MinFilter(3))
    )
    return mask.resize(image.size, Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(1))


def _cut_out(image: Image.Image, mask: Image.Image) -> tuple[Image.Image, Image.Image]:
    box = mask.point(lambda v: 255 if v > 64 else 0).getbbox() or (0, 0, *image.size)
    return image.crop(box), mask.crop(box)


# --------------------------------------------------------------------------------------------- surfaces


def procedural_surface(side: int, rng: np.random.Generator) -> Image.Image:
    """A table, floor or bed under the product: wood grain, tiles, woven fabric or stone."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    kind = int(rng.integers(4))
    base = rng.uniform(70, 210, 3)
    accent = base * rng.uniform(0.55, 0.85)
    if kind == 0:  # wood: rings bent by a slow wave
        angle = rng.uniform(0, math.pi)
        u = x * math.cos(angle) + y * math.sin(angle)
        v = -x * math.sin(angle) + y * math.cos(angle)
        rings = np.sin((u + 0.05 * np.sin(v * rng.uniform(4, 9))) * rng.uniform(25, 60))
        weight = (0.5 + 0.5 * rings) ** 3
    elif kind == 1:  # tiles with grout lines
        tiles = rng.uniform(3, 8)
        fx, fy = (x * tiles) % 1.0, (y * tiles) % 1.0
        grout = (np.minimum(fx, 1 - fx) < 0.04) | (np.minimum(fy, 1 - fy) < 0.04)
        weight = grout.astype(np.float32) + 0.15 * np.sin(x * 40 + y * 13) ** 2
    elif kind == 2:  # woven fabric: two crossing threads
        pitch = rng.uniform(60, 140)
        weight = 0.5 * (np.sin(x * pitch) * np.sin(y * pitch) + 1) * 0.6
    else:  # stone: turbulent veins
        turbulence = sum(np.sin(x * f * rng.uniform(0.8, 1.2) + y * f * rng.uniform(0.5, 1.5)) / f for f in (3, 7, 17))
        weight = np.abs(np.sin(6 * (x + y) + 3 * turbulence)) ** 0.3
    pixels = base * (1 - weight[..., None]) + accent * weight[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _real_surface(photo: Image.Image, side: int, rng: np.random.Generator) -> Image.Image:
    crop = int(min(photo.size) * rng.uniform(0.4, 1.0))
    x0 = int(rng.integers(0, photo.width - crop + 1))
    y0 = int(rng.integers(0, photo.height - crop + 1))
    surface = photo.crop((x0, y0, x0 + crop, y0 + crop)).resize((side, side), Image.Resampling.BICUBIC)
    return ImageOps.mirror(surface) if rng.random() < 0.5 else surface


# ------------------------------------------------------------------------------------------- the camera


def _tilt(item: Image.Image, mask: Image.Image, strength: HeldoutStrength, rng: np.random.Generator):
    """The product seen by a camera rotated about x, y and its own axis: a plane-induced homography."""
    tx, ty = np.radians(rng.uniform(-strength.tilt_degrees, strength.tilt_degrees, 2))
    roll = np.radians(rng.uniform(-strength.roll_degrees, strength.roll_degrees))
    w, h = item.size
    f = strength.focal * max(w, h)
    camera = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(tx), -math.sin(tx)], [0, math.sin(tx), math.cos(tx)]])
    ry = np.array([[math.cos(ty), 0, math.sin(ty)], [0, 1, 0], [-math.sin(ty), 0, math.cos(ty)]])
    rz = np.array([[math.cos(roll), -math.sin(roll), 0], [math.sin(roll), math.cos(roll), 0], [0, 0, 1]])
    forward = camera @ rz @ ry @ rx @ np.linalg.inv(camera)
    corners = np.array([[0, 0, 1], [w, 0, 1], [w, h, 1], [0, h, 1]], float) @ forward.T
    corners = corners[:, :2] / corners[:, 2:]
    low = corners.min(axis=0)
    width, height = (int(v) for v in np.ceil(corners.max(axis=0) - low).clip(8, 4 * max(w, h)))
    size = (width, height)
    shift = np.array([[1, 0, -low[0]], [0, 1, -low[1]], [0, 0, 1]])
    inverse = np.linalg.inv(shift @ forward)
    coefficients = (inverse / inverse[2, 2]).ravel()[:8]
    warp = Image.Transform.PERSPECTIVE
    return (
        item.transform(size, warp, coefficients, Image.Resampling.BICUBIC),
        mask.transform(size, warp, coefficients, Image.Resampling.BILINEAR),
    )


def _cast_shadow(photo: Image.Image, mask: Image.Image, at: tuple[int, int], rng: np.random.Generator) -> None:
    offset = rng.integers(-mask.width // 10 - 1, mask.width // 10 + 2, 2)
    shadow = mask.filter(ImageFilter.GaussianBlur(max(2, mask.width // 20))).point(lambda v: int(v * 0.45))
    dark = Image.new("RGB", photo.size, (20, 20, 25))
    layer = Image.new("L", photo.size, 0)
    layer.paste(shadow, (at[0] + int(offset[0]), at[1] + int(offset[1])))
    photo.paste(dark, (0, 0), layer)


def _lay_across(
    photo: Image.Image,
    other: Image.Image,
    item_box: tuple[int, int, int, int],
    strength: HeldoutStrength,
    rng: np.random.Generator,
) -> None:
    """Another product lies across one edge of the item, covering a share of its box."""
    other_item, other_mask = _cut_out(other, product_mask(other))
    x0, y0, x1, y1 = item_box
    w, h = x1 - x0, y1 - y0
    size = rng.uniform(0.5, 0.9) * max(w, h)
    scale = size / max(other_item.size)
    new_size = (max(6, round(other_item.width * scale)), max(6, round(other_item.height * scale)))
    angle = float(rng.uniform(0, 360))
    other_item = other_item.resize(new_size).rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
    other_mask = other_mask.resize(new_size).rotate(angle, expand=True, resample=Image.Resampling.BILINEAR)
    overlap = rng.uniform(*strength.product_occlusion_overlap)
    side = int(rng.integers(4))
    if side == 0:  # from the left
        px, py = x0 - other_item.width + overlap * w, y0 + rng.uniform(0, 1) * h - other_item.height / 2
    elif side == 1:  # from the right
        px, py = x1 - overlap * w, y0 + rng.uniform(0, 1) * h - other_item.height / 2
    elif side == 2:  # from above
        px, py = x0 + rng.uniform(0, 1) * w - other_item.width / 2, y0 - other_item.height + overlap * h
    else:  # from below
        px, py = x0 + rng.uniform(0, 1) * w - other_item.width / 2, y1 - overlap * h
    photo.paste(other_item, (int(px), int(py)), other_mask)


# --------------------------------------------------------------------------------------- light and sensor


def kelvin_gains(kelvin: float) -> np.ndarray:
    """Per-channel gains of a scene lit at this colour temperature, relative to daylight (6500 K).

    Tanner Helland's fit of the black-body colour (valid 1000-40000 K), normalised at 6500 K."""

    def rgb(t: float) -> np.ndarray:
        t = t / 100.0
        red = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
        green = 99.4708025861 * math.log(t) - 161.1195681661 if t <= 66 else 288.1221695283 * (t - 60) ** -0.0755148492
        blue = 255.0 if t >= 66 else (0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307)
        return np.clip(np.array([red, green, blue]), 1.0, 255.0)

    return rgb(kelvin) / rgb(6500.0)


def _light(photo: Image.Image, strength: HeldoutStrength, rng: np.random.Generator) -> Image.Image:
    side = photo.width
    pixels = np.asarray(photo, np.float32) / 255.0
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
    direction = rng.uniform(0, 2 * math.pi)
    ramp = 1.0 + rng.uniform(0, strength.side_light) * (x * math.cos(direction) + y * math.sin(direction))
    vignette = 1.0 - rng.uniform(0, strength.vignette) * (x**2 + y**2) * 2
    pixels = pixels * (ramp * vignette)[..., None] * kelvin_gains(rng.uniform(*strength.kelvin))
    pixels = np.clip(pixels, 0, 1) ** rng.uniform(*strength.gamma)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def _sensor(photo: Image.Image, strength: HeldoutStrength, rng: np.random.Generator) -> Image.Image:
    if rng.random() < strength.motion_blur_probability:
        length = int(rng.integers(strength.motion_blur_px[0], strength.motion_blur_px[1] + 1))
        angle = rng.uniform(0, 180)
        streak = Image.new("L", (length * 2 + 1, length * 2 + 1), 0)
        streak.paste(255, (0, length, 2 * length + 1, length + 1))
        streak = streak.rotate(angle, resample=Image.Resampling.BILINEAR)
        kernel = np.asarray(streak, np.float32)
        kernel /= kernel.sum()
        photo = _convolve(photo, kernel)
    pixels = np.asarray(photo, np.float32) / 255.0
    shot = rng.normal(0.0, 1.0, pixels.shape) * np.sqrt(pixels) * strength.shot_noise
    coarse = rng.normal(0.0, strength.chroma_noise / 255.0, (photo.height // 8 + 1, photo.width // 8 + 1, 3))
    chroma = (
        np.asarray(
            Image.fromarray(((coarse + 0.5).clip(0, 1) * 255).astype(np.uint8)).resize(
                photo.size, Image.Resampling.BICUBIC
            ),
            np.float32,
        )
        / 255.0
        - 0.5
    )
    pixels = np.clip(pixels + shot + chroma, 0, 1)
    return Image.fromarray((pixels * 255).astype(np.uint8))


def _convolve(photo: Image.Image, kernel: np.ndarray) -> Image.Image:
    pixels = np.asarray(photo, np.float32)
    radius = kernel.shape[0] // 2
    padded = np.pad(pixels, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    out = np.zeros_like(pixels)
    for dy, dx in zip(*np.nonzero(kernel)):
        out += kernel[dy, dx] * padded[dy : dy + pixels.shape[0], dx : dx + pixels.shape[1]]
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def _phone_file(photo: Image.Image, strength: HeldoutStrength, rng: np.random.Generator) -> Image.Image:
    """Downsampled by the phone, saved as JPEG, then re-saved by a messenger on a shifted 8x8 grid."""
    side = photo.width
    small = max(32, int(side * rng.uniform(*strength.downsample)))
    photo = photo.resize((small, small), Image.Resampling.BILINEAR).resize((side, side), Image.Resampling.BICUBIC)
    photo = _jpeg(photo, int(rng.integers(strength.jpeg_first[0], strength.jpeg_first[1] + 1)))
    dx, dy = (int(v) for v in rng.integers(1, 8, 2))
    shifted = photo.crop((dx, dy, side, side)).resize((side, side), Image.Resampling.BICUBIC)
    return _jpeg(shifted, int(rng.integers(strength.jpeg_second[0], strength.jpeg_second[1] + 1)))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")
