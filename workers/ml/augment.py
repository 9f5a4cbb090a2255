"""Shopper-view augmentation: turn one (catalog) image into a photo a shopper might take of the same product.

A shopper photo differs from the catalog photo by viewpoint (rotation, shear, perspective), framing (scale,
crop, aspect), lighting (brightness, contrast, saturation, a colour cast), a cluttered background, partial
occlusion (a hand, a bag strap), blur, sensor noise and JPEG re-encoding. `shopper_view` applies a random mix of
those, deterministically from a seed or a numpy Generator, to any `Record`:

- landmarks move with the geometry; a landmark that leaves the frame or falls under an occluder gets
  visibility 0 (its coordinates stay where the point really is, possibly outside [0, 1]);
- a horizontal flip swaps the left/right landmark slots (`LANDMARK_FLIP_PAIRS` for the 8-slot layout);
- `record.extra["mask"]` (an "L" image, 255 on the item), when present, lets the background be replaced by
  clutter behind the item, and moves along with the image; `extra["bbox"]` (normalised x0, y0, x1, y1) too.
  Without a mask, a plain studio backdrop is recognised (`estimate_item_mask`); otherwise clutter only fills
  the border that the viewpoint change exposes.

Strength presets (`STRENGTHS`): "catalog" (another studio photo of the product), "mild", "query" (the
evaluation shopper photos) and "strong" (training positives harder than the queries, for robustness).

Geometry is one 3x3 homography in continuous pixel coordinates (pixel i covers [i, i+1)), which is also the
convention PIL uses when it resamples, so a landmark at normalised x maps exactly like the pixels under it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from workers.ml.records import Record

# Left/right landmark slots swapped by a horizontal flip in the FashionNet 8-slot layout
# (collar, sleeve, waistline, hem; each left then right).
LANDMARK_FLIP_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (2, 3), (4, 5), (6, 7))

# Augmenting a 28x28 Fashion-MNIST image at its own size would make blur and JPEG blocks cover the whole
# product; upscale small inputs first so every effect acts at the scale of a phone photo.
MIN_AUGMENT_SIZE = 112

# A catalog photo on a plain backdrop lets us find the item without a mask: the backdrop is the border
# colour, connected to the border. Estimated on a small copy: it only decides where clutter may go.
STUDIO_BORDER_SPREAD = 14.0  # max std (0..255) of the border colours for the backdrop to count as plain
STUDIO_TOLERANCE = 28.0  # colour distance to the backdrop colour that still counts as backdrop
MASK_WORK_SIZE = 64  # side of the copy the mask is estimated on (keeps it ~1 ms)

RngLike = np.random.Generator | int | None


@dataclass(frozen=True)
class AugmentStrength:
    """How far a shopper view may stray from the source image (each effect's maximum or range)."""

    name: str
    rotation_degrees: float = 0.0  # max |in-plane rotation|
    shear: float = 0.0  # max |shear| (tangent)
    perspective: float = 0.0  # max corner displacement, fraction of the image size
    scale: tuple[float, float] = (1.0, 1.0)  # item magnification; > 1 zooms in and crops
    aspect: float = 0.0  # max |log| of the horizontal/vertical scale ratio
    translate: float = 0.0  # max shift, fraction of the image size
    flip_probability: float = 0.0  # mirror selfies
    clutter_probability: float = 0.0  # busy background behind the item (or in the exposed border)
    occlusion_probability: float = 0.0
    occlusion_area: tuple[float, float] = (0.05, 0.2)  # fraction of the item's box covered
    brightness: float = 0.0  # max relative change
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # max hue rotation (fraction of the wheel); small: colour is part of product identity
    colour_cast: float = 0.0  # max relative per-channel gain (white balance)
    blur_probability: float = 0.0
    blur_radius: tuple[float, float] = (0.5, 1.5)  # pixels at MIN_AUGMENT_SIZE scale
    noise_std: float = 0.0  # max Gaussian sensor noise, in 0..255 units
    jpeg_probability: float = 0.0
    jpeg_quality: tuple[int, int] = (40, 90)


NONE = AugmentStrength("none")
CATALOG = AugmentStrength(
    "catalog",
    rotation_degrees=4,
    scale=(0.92, 1.05),
    translate=0.04,
    brightness=0.06,
    contrast=0.06,
    colour_cast=0.03,
)
MILD = AugmentStrength(
    "mild",
    rotation_degrees=8,
    shear=0.05,
    perspective=0.04,
    scale=(0.85, 1.12),
    aspect=0.06,
    translate=0.06,
    flip_probability=0.5,
    clutter_probability=0.3,
    occlusion_probability=0.15,
    occlusion_area=(0.03, 0.1),
    brightness=0.15,
    contrast=0.15,
    saturation=0.15,
    hue=0.01,
    colour_cast=0.06,
    blur_probability=0.2,
    blur_radius=(0.4, 1.0),
    noise_std=3,
    jpeg_probability=0.3,
    jpeg_quality=(60, 95),
)
QUERY = AugmentStrength(
    "query",
    rotation_degrees=12,
    shear=0.08,
    perspective=0.07,
    scale=(0.75, 1.2),
    aspect=0.1,
    translate=0.08,
    flip_probability=0.0,
    clutter_probability=0.6,
    occlusion_probability=0.35,
    occlusion_area=(0.04, 0.15),
    brightness=0.25,
    contrast=0.25,
    saturation=0.25,
    hue=0.02,
    colour_cast=0.1,
    blur_probability=0.4,
    blur_radius=(0.4, 1.4),
    noise_std=6,
    jpeg_probability=0.6,
    jpeg_quality=(35, 85),
)
STRONG = AugmentStrength(
    "strong",
    rotation_degrees=18,
    shear=0.12,
    perspective=0.1,
    scale=(0.65, 1.3),
    aspect=0.15,
    translate=0.1,
    flip_probability=0.5,
    clutter_probability=0.7,
    occlusion_probability=0.5,
    occlusion_area=(0.05, 0.22),
    brightness=0.35,
    contrast=0.35,
    saturation=0.35,
    hue=0.03,
    colour_cast=0.14,
    blur_probability=0.5,
    blur_radius=(0.5, 2.0),
    noise_std=9,
    jpeg_probability=0.7,
    jpeg_quality=(25, 85),
)
STRENGTHS: dict[str, AugmentStrength] = {s.name: s for s in (NONE, CATALOG, MILD, QUERY, STRONG)}


def as_rng(rng: RngLike) -> np.random.Generator:
    """A Generator from a seed, an existing Generator (used as is) or None (fresh entropy)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def as_strength(strength: AugmentStrength | str) -> AugmentStrength:
    return STRENGTHS[strength] if isinstance(strength, str) else strength


# --------------------------------------------------------------------------------------------- backgrounds


def random_background(size: tuple[int, int], rng: RngLike, style: str | None = None) -> Image.Image:
    """A background image: "plain" / "gradient" (studio), "texture" (smooth colour noise), "clutter" / "room".

    `style=None` picks one of the busy styles (texture, clutter, room), as behind a shopper photo.
    """
    rng = as_rng(rng)
    width, height = size
    if style is None:
        style = str(rng.choice(["texture", "clutter", "room"]))
    if style == "plain":
        return Image.new("RGB", size, _light_colour(rng))
    if style == "gradient":
        top, bottom = np.array(_light_colour(rng), float), np.array(_light_colour(rng), float)
        ramp = np.linspace(0.0, 1.0, height)[:, None, None]
        pixels = top * (1 - ramp) + bottom * ramp
        return Image.fromarray(np.broadcast_to(pixels, (height, width, 3)).astype(np.uint8))
    if style == "texture":
        return _smooth_noise(size, rng, cells=int(rng.integers(3, 9)))
    if style in ("clutter", "room"):
        if style == "room":
            # A wall and a floor meeting at a random height, each a smooth colour field.
            image = _smooth_noise(size, rng, cells=3)
            floor = _smooth_noise(size, rng, cells=4)
            horizon = int(height * rng.uniform(0.45, 0.8))
            image.paste(floor.crop((0, horizon, width, height)), (0, horizon))
        else:
            image = _smooth_noise(size, rng, cells=int(rng.integers(2, 5)))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 10))):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
            w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
            kind = rng.integers(3)
            if kind == 0:
                draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
            elif kind == 1:
                draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
            else:
                draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=max(1, int(width * rng.uniform(0.01, 0.05))))
        return image
    raise ValueError(f"unknown background style {style!r}")


def _light_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    base = rng.uniform(215, 255)
    return tuple(int(np.clip(base + rng.uniform(-12, 12), 0, 255)) for _ in range(3))  # type: ignore[return-value]


def _smooth_noise(size: tuple[int, int], rng: np.random.Generator, cells: int) -> Image.Image:
    # Real rooms are muted: pull random colours halfway towards a random grey.
    grey = rng.uniform(60, 200)
    grid = 0.5 * rng.uniform(0, 255, (cells, cells, 3)) + 0.5 * grey
    return Image.fromarray(grid.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)


# ------------------------------------------------------------------------------------------------ geometry


def translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def horizontal_flip(width: float) -> np.ndarray:
    """Mirror x in continuous pixel coordinates: x -> width - x."""
    return np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def homography_from_points(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 3x3 projective map taking four source points (4, 2) onto four target points."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(source, target):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    h = np.linalg.solve(np.array(rows, float), np.array(rhs, float))
    return np.append(h, 1.0).reshape(3, 3)


def apply_homography(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a 3x3 homography."""
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ matrix.T
    return homogeneous[:, :2] / homogeneous[:, 2:3]


def warp_image(
    image: Image.Image,
    matrix: np.ndarray,
    size: tuple[int, int] | None = None,
    fill: int | tuple[int, ...] = 0,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> Image.Image:
    """Resample `image` so that source pixel position p lands at `matrix @ p` in an output of `size`."""
    inverse = np.linalg.inv(matrix)
    inverse = inverse / inverse[2, 2]
    coefficients = tuple(float(c) for c in inverse.reshape(-1)[:8])
    return image.transform(size or image.size, Image.Transform.PERSPECTIVE, coefficients, resample, fillcolor=fill)


def warp_record(
    record: Record,
    matrix: np.ndarray,
    size: tuple[int, int] | None = None,
    fill: tuple[int, int, int] | None = None,
    swap_pairs: tuple[tuple[int, int], ...] = (),
) -> Record:
    """Apply one geometric transform (3x3 homography in pixel coordinates) to a record and its labels.

    Landmarks move with the pixels and become invisible when they leave the frame; `swap_pairs` exchanges
    landmark slots (a mirroring transform turns the left sleeve into the right one). `extra["mask"]` is
    warped too and `extra["bbox"]` recomputed. Exposed border is filled with `fill` (default: the image's
    own border colour, which is seamless for studio photos).
    """
    out_size = size or record.image.size
    if fill is None:
        fill = border_colour(record.image)
    image = warp_image(record.image.convert("RGB"), matrix, out_size, fill)
    extra = dict(record.extra)
    if "mask" in extra:
        extra["mask"] = warp_image(extra["mask"], matrix, out_size, 0)
        extra["bbox"] = mask_bbox(extra["mask"])
    elif "bbox" in extra:
        x0, y0, x1, y1 = extra["bbox"]
        w, h = record.image.size
        corners = np.array([[x0 * w, y0 * h], [x1 * w, y0 * h], [x0 * w, y1 * h], [x1 * w, y1 * h]])
        moved = apply_homography(matrix, corners) / np.array(out_size, float)
        lo, hi = np.clip(moved.min(axis=0), 0, 1), np.clip(moved.max(axis=0), 0, 1)
        extra["bbox"] = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
    landmarks, visibility = record.landmarks, record.visibility
    if landmarks is not None:
        in_pixels = landmarks.astype(np.float64) * np.array(record.image.size, float)
        landmarks = (apply_homography(matrix, in_pixels) / np.array(out_size, float)).astype(np.float32)
        visibility = np.ones(len(landmarks), np.float32) if visibility is None else visibility.astype(np.float32).copy()
        for a, b in swap_pairs:
            if max(a, b) < len(landmarks):
                landmarks[[a, b]] = landmarks[[b, a]]
                visibility[[a, b]] = visibility[[b, a]]
        visibility = visibility * inside_frame(landmarks).astype(np.float32)
    return replace(record, image=image, landmarks=landmarks, visibility=visibility, extra=extra)


def inside_frame(landmarks: np.ndarray) -> np.ndarray:
    """(K,) bool: the normalised point lies inside the image."""
    return np.all((landmarks >= 0.0) & (landmarks < 1.0), axis=1)


def mask_bbox(mask: Image.Image) -> tuple[float, float, float, float]:
    """Normalised (x0, y0, x1, y1) box around the non-zero pixels of a mask; the whole image if empty."""
    box = mask.getbbox()
    if box is None:
        return (0.0, 0.0, 1.0, 1.0)
    w, h = mask.size
    return (box[0] / w, box[1] / h, box[2] / w, box[3] / h)


def grow_from_border(passable: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: the pixels reachable from the image border through `passable` pixels (4-connected)."""
    reached = np.zeros_like(passable)
    reached[:, 0, :], reached[:, -1, :] = passable[:, 0, :], passable[:, -1, :]
    reached[:, :, 0], reached[:, :, -1] = passable[:, :, 0], passable[:, :, -1]
    while True:
        grown = reached.copy()
        grown[:, 1:, :] |= reached[:, :-1, :]
        grown[:, :-1, :] |= reached[:, 1:, :]
        grown[:, :, 1:] |= reached[:, :, :-1]
        grown[:, :, :-1] |= reached[:, :, 1:]
        grown &= passable
        if np.array_equal(grown, reached):
            return reached
        reached = grown


def estimate_item_mask(image: Image.Image) -> Image.Image | None:
    """An "L" mask of the product in a studio photo (plain backdrop), or None if the backdrop is not plain."""
    small = np.asarray(image.convert("RGB").resize((MASK_WORK_SIZE, MASK_WORK_SIZE)), np.float32)
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    if border.std(axis=0).max() > STUDIO_BORDER_SPREAD:
        return None
    near_backdrop = np.linalg.norm(small - np.median(border, axis=0), axis=2) <= STUDIO_TOLERANCE
    item = ~grow_from_border(near_backdrop[None])[0]
    if item.mean() < 0.02:  # nothing stands out from the backdrop
        return None
    mask = Image.fromarray(item.astype(np.uint8) * 255)
    return mask.resize(image.size, Image.Resampling.BILINEAR)


def border_colour(image: Image.Image) -> tuple[int, int, int]:
    """Median colour of the image border: the studio background colour of a catalog photo."""
    pixels = np.asarray(image.convert("RGB"))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(c) for c in np.median(border, axis=0))  # type: ignore[return-value]


def random_geometry(strength: AugmentStrength, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random viewpoint change: scale/aspect/shear/rotation about the centre, a shift, then perspective."""
    width, height = size
    scale = rng.uniform(*strength.scale)
    log_aspect = rng.uniform(-strength.aspect, strength.aspect)
    sx, sy = scale * np.exp(log_aspect / 2), scale * np.exp(-log_aspect / 2)
    angle = np.deg2rad(rng.uniform(-strength.rotation_degrees, strength.rotation_degrees))
    shear = rng.uniform(-strength.shear, strength.shear)
    dx, dy = rng.uniform(-strength.translate, strength.translate, 2) * np.array([width, height])
    cos, sin = np.cos(angle), np.sin(angle)
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([sx, sy])
    affine = np.eye(3)
    affine[:2, :2] = linear
    matrix = translation(width / 2 + dx, height / 2 + dy) @ affine @ translation(-width / 2, -height / 2)
    if strength.perspective > 0:
        corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], float)
        jitter = rng.uniform(-strength.perspective, strength.perspective, (4, 2)) * np.array([width, height])
        matrix = homography_from_points(corners, corners + jitter) @ matrix
    return matrix


# ------------------------------------------------------------------------------------------ the full view


def shopper_view(record: Record, rng: RngLike = None, strength: AugmentStrength | str = QUERY) -> Record:
    """A random shopper photo of the product in `record`, with its labels carried along.

    Deterministic for a given seed (or Generator state). The result may be larger than the input (small
    images are first upscaled to MIN_AUGMENT_SIZE) and is always RGB; category, attributes and instance id
    are unchanged.
    """
    rng = as_rng(rng)
    strength = as_strength(strength)
    if strength == NONE:
        return replace(record, image=record.image.convert("RGB"), extra=dict(record.extra))
    record = _upscale_small(record)
    size = record.image.size

    matrix = random_geometry(strength, size, rng)
    swap: tuple[tuple[int, int], ...] = ()
    if rng.random() < strength.flip_probability:
        matrix = matrix @ horizontal_flip(size[0])
        if record.landmarks is not None and len(record.landmarks) == 8:
            swap = LANDMARK_FLIP_PAIRS
    use_clutter = rng.random() < strength.clutter_probability
    if use_clutter and "mask" not in record.extra:
        mask = estimate_item_mask(record.image)
        if mask is not None:
            record = replace(record, extra={**record.extra, "mask": mask, "bbox": mask_bbox(mask)})
    warped = warp_record(record, matrix, swap_pairs=swap)
    if use_clutter:
        warped = _put_on_background(record, warped, matrix, random_background(size, rng))
    if rng.random() < strength.occlusion_probability:
        warped = _occlude(warped, strength, rng)

    image = _photometric(warped.image, strength, rng)
    if rng.random() < strength.blur_probability:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*strength.blur_radius)))
    if strength.noise_std > 0:
        noise = rng.normal(0.0, rng.uniform(0, strength.noise_std), (size[1], size[0], 3))
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8))
    if rng.random() < strength.jpeg_probability:
        image = jpeg_reencode(image, int(rng.integers(strength.jpeg_quality[0], strength.jpeg_quality[1] + 1)))
    return replace(warped, image=image)


def jpeg_reencode(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _upscale_small(record: Record) -> Record:
    width, height = record.image.size
    if min(width, height) >= MIN_AUGMENT_SIZE:
        return record
    factor = MIN_AUGMENT_SIZE / min(width, height)
    size = (round(width * factor), round(height * factor))
    extra = dict(record.extra)
    if "mask" in extra:
        extra["mask"] = extra["mask"].resize(size, Image.Resampling.BILINEAR)
    # Normalised landmarks and boxes are unchanged by a uniform resize.
    return replace(record, image=record.image.convert("RGB").resize(size, Image.Resampling.BICUBIC), extra=extra)


def _put_on_background(source: Record, warped: Record, matrix: np.ndarray, background: Image.Image) -> Record:
    """Composite the warped item over `background`: behind the item if its mask is known, else in the border."""
    if "mask" in warped.extra:
        foreground = warped.extra["mask"]
    else:
        foreground = warp_image(Image.new("L", source.image.size, 255), matrix, warped.image.size, 0)
    return replace(warped, image=Image.composite(warped.image, background, foreground))


def _occlude(record: Record, strength: AugmentStrength, rng: np.random.Generator) -> Record:
    """Cover part of the item with a blob (a hand, a strap, another object); landmarks under it turn invisible."""
    width, height = record.image.size
    x0, y0, x1, y1 = record.extra.get("bbox", (0.15, 0.15, 0.85, 0.85))
    box_w, box_h = max(x1 - x0, 0.1) * width, max(y1 - y0, 0.1) * height
    area = rng.uniform(*strength.occlusion_area) * box_w * box_h
    aspect = np.exp(rng.uniform(-0.8, 0.8))
    ow, oh = np.sqrt(area * aspect), np.sqrt(area / aspect)
    cx = rng.uniform(x0 * width, x1 * width)
    cy = rng.uniform(y0 * height, y1 * height)
    occluder = Image.new("L", record.image.size, 0)
    draw = ImageDraw.Draw(occluder)
    shape = (cx - ow / 2, cy - oh / 2, cx + ow / 2, cy + oh / 2)
    if rng.random() < 0.5:
        draw.ellipse(shape, fill=255)
    else:
        draw.rectangle(shape, fill=255)
    skin_or_object = (
        (int(rng.uniform(150, 240)), int(rng.uniform(100, 190)), int(rng.uniform(80, 160)))
        if rng.random() < 0.5
        else tuple(int(c) for c in rng.integers(0, 256, 3))
    )
    texture = Image.new("RGB", record.image.size, skin_or_object)
    image = Image.composite(texture, record.image, occluder)
    visibility = record.visibility
    if record.landmarks is not None and visibility is not None:
        covered = np.asarray(occluder) > 127
        pixels = np.floor(record.landmarks * np.array([width, height])).astype(int)
        inside = inside_frame(record.landmarks)
        hidden = np.zeros(len(pixels), bool)
        hidden[inside] = covered[pixels[inside, 1], pixels[inside, 0]]
        visibility = visibility * (~hidden).astype(np.float32)
    return replace(record, image=image, visibility=visibility)


def _photometric(image: Image.Image, strength: AugmentStrength, rng: np.random.Generator) -> Image.Image:
    def factor(amount: float) -> float:
        return float(1.0 + rng.uniform(-amount, amount))

    image = ImageEnhance.Brightness(image).enhance(factor(strength.brightness))
    image = ImageEnhance.Contrast(image).enhance(factor(strength.contrast))
    image = ImageEnhance.Color(image).enhance(factor(strength.saturation))
    if strength.hue > 0:
        hsv = np.asarray(image.convert("HSV")).copy()
        shift = int(round(rng.uniform(-strength.hue, strength.hue) * 256))
        hsv[..., 0] = (hsv[..., 0].astype(int) + shift) % 256
        image = Image.fromarray(hsv, "HSV").convert("RGB")
    if strength.colour_cast > 0:
        gains = 1.0 + rng.uniform(-strength.colour_cast, strength.colour_cast, 3)
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) * gains, 0, 255).astype(np.uint8))
    return image
