"""A procedural product renderer: garments, shoes and bags drawn in colour, with every label known exactly.

A product is a seed. `product_spec(seed)` decides what it is (category, colour, pattern, sleeves, neckline,
details, proportions); `render_product(seed, view)` draws one catalog photo of it: view 0 is the canonical
studio photo, views 1, 2, ... are other catalog photos of the same product (slightly different pose, sleeve
angle, framing and backdrop). Shopper photos come from `workers.ml.augment.shopper_view` on top.

Every Record carries: instance_id = the seed, category, multi-hot attributes, 8 landmarks in the FashionNet
layout (`LANDMARK_NAMES`; left = image left in the canonical pose) with visibility, and in `extra` the item
mask ("mask", an "L" image), its box ("bbox"), the seed, view and a human description ("title").
Landmarks that a category does not have (the waistline of a T-shirt, the collar of a skirt) are (0, 0) with
visibility 0. Shoes and bags reuse the slots for their own keypoints (see `_shoe` and `_bag`).

Drawing happens in an item-local frame (roughly x, y in [-0.5, 0.5], y down) that a pose maps onto a 2x
supersampled canvas; patterns are functions of local coordinates so they follow the item's pose.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from workers.ml.augment import mask_bbox, random_background
from workers.ml.records import LabelSpace, Record

RENDER_SIZE = 128  # default output size: enough detail for patterns, cheap enough to render on the fly
SUPERSAMPLE = 2  # draw at 2x and downsample: PIL polygons are not antialiased
ITEM_FILL = 0.78  # the item's longer side in the canonical view, as a fraction of the image
TRAIN_FIRST_SEED = 0  # renderer splits are disjoint seed ranges, so evaluation products are never trained on
EVAL_FIRST_SEED = 10_000_000
# Held-out landmark views (the PCK a shop retrain reports): past the demo (20M), benchmark (30M-49M) catalogs' ranges
LANDMARK_HELDOUT_FIRST_SEED = 60_000_000

CATEGORIES: tuple[str, ...] = ("top", "shirt", "dress", "coat", "trousers", "shorts", "skirt", "shoe", "bag")
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (30, 30, 32),
    "white": (242, 242, 238),
    "grey": (140, 140, 145),
    "red": (200, 30, 40),
    "orange": (235, 120, 30),
    "yellow": (240, 205, 50),
    "green": (40, 140, 70),
    "blue": (40, 100, 210),
    "navy": (25, 35, 90),
    "purple": (120, 50, 150),
    "pink": (235, 130, 170),
    "brown": (115, 70, 40),
    "beige": (215, 190, 150),
}
PATTERNS = ("solid", "stripes", "dots", "checks", "print")
SLEEVES = ("none", "short", "long")
NECKLINES = ("round", "v", "collar")
DETAILS = ("buttons", "pocket", "belt", "trim")
FITS = ("flared", "straight")
STYLES = ("sneaker", "boot", "heel", "tote", "handbag", "clutch")

ATTRIBUTES: tuple[str, ...] = (
    *(f"colour:{c}" for c in COLOURS),
    *(f"pattern:{p}" for p in PATTERNS),
    *(f"sleeve:{s}" for s in SLEEVES),
    *(f"neckline:{n}" for n in NECKLINES),
    *(f"detail:{d}" for d in DETAILS),
    *(f"fit:{f}" for f in FITS),
    *(f"style:{s}" for s in STYLES),
)
LANDMARK_NAMES: tuple[str, ...] = (
    "left collar",
    "right collar",
    "left sleeve",
    "right sleeve",
    "left waistline",
    "right waistline",
    "left hem",
    "right hem",
)
COLLAR_L, COLLAR_R, SLEEVE_L, SLEEVE_R, WAIST_L, WAIST_R, HEM_L, HEM_R = range(8)
LABEL_SPACE = LabelSpace(categories=CATEGORIES, attributes=ATTRIBUTES, num_landmarks=len(LANDMARK_NAMES))

PATTERN_WORDS = {"solid": "", "stripes": "striped", "dots": "polka-dot", "checks": "checked", "print": "printed"}


@dataclass(frozen=True)
class ProductSpec:
    """Everything that makes one rendered product what it is (a pure function of the seed)."""

    seed: int
    category: str
    colour: str  # palette name (the attribute)
    main_rgb: tuple[int, int, int]  # jittered around the palette colour so same-named products differ
    second_rgb: tuple[int, int, int]  # pattern colour
    accent_rgb: tuple[int, int, int]  # trim, belt, buttons, soles
    pattern: str
    pattern_scale: float  # local units per pattern period
    pattern_angle: float  # radians
    pattern_phase: tuple[float, float]
    sleeve: str | None  # None where the category has no sleeves
    neckline: str | None
    fit: str | None
    style: str | None
    details: tuple[str, ...]
    shape: dict[str, float] = field(default_factory=dict)  # category-specific proportions

    @property
    def attribute_names(self) -> tuple[str, ...]:
        names = [f"colour:{self.colour}", f"pattern:{self.pattern}"]
        if self.sleeve:
            names.append(f"sleeve:{self.sleeve}")
        if self.neckline:
            names.append(f"neckline:{self.neckline}")
        names += [f"detail:{d}" for d in self.details]
        if self.fit:
            names.append(f"fit:{self.fit}")
        if self.style:
            names.append(f"style:{self.style}")
        return tuple(names)

    @property
    def title(self) -> str:
        """A product title a shop could show, e.g. "Navy striped shirt with long sleeves and pocket"."""
        noun = self.style if self.style else self.category
        words = [self.colour, PATTERN_WORDS[self.pattern], noun]
        extras = []
        if self.sleeve and self.category in ("top", "dress", "shirt"):
            extras.append({"none": "sleeveless", "short": "short sleeves", "long": "long sleeves"}[self.sleeve])
        extras += [
            {"buttons": "buttons", "pocket": "pocket", "belt": "belt", "trim": "contrast trim"}[d] for d in self.details
        ]
        title = " ".join(w for w in words if w).capitalize()
        if not extras:
            return title
        listed = extras[0] if len(extras) == 1 else f"{', '.join(extras[:-1])} and {extras[-1]}"
        return f"{title} with {listed}"


def attribute_vector(names: Sequence[str], label_space: LabelSpace = LABEL_SPACE) -> np.ndarray:
    """Multi-hot float32 vector over `label_space.attributes`; unknown names are ignored."""
    index = {name: i for i, name in enumerate(label_space.attributes)}
    vector = np.zeros(len(label_space.attributes), np.float32)
    for name in names:
        if name in index:
            vector[index[name]] = 1.0
    return vector


# ------------------------------------------------------------------------------------------------ the spec


def product_spec(seed: int) -> ProductSpec:
    """Decide everything about product `seed` (same seed, same product, on every machine)."""
    rng = np.random.default_rng([seed, 0x5EED])
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    colour = str(rng.choice(list(COLOURS)))
    main = _jitter_colour(COLOURS[colour], rng, amount=1.0)
    second_name = str(rng.choice([c for c in COLOURS if c != colour]))
    second = _jitter_colour(COLOURS[second_name], rng, amount=1.0)
    accent = _jitter_colour(COLOURS[str(rng.choice(list(COLOURS)))], rng, amount=1.0)
    pattern = str(rng.choice(PATTERNS, p=[0.3, 0.2, 0.17, 0.17, 0.16]))
    sleeve = neckline = fit = style = None
    details: list[str] = []
    shape: dict[str, float] = {}

    def maybe(detail: str, probability: float) -> None:
        if rng.random() < probability:
            details.append(detail)

    if category in ("top", "shirt", "dress", "coat"):
        shape.update(
            shoulder=rng.uniform(0.19, 0.25),
            neck=rng.uniform(0.06, 0.1),
            armhole=rng.uniform(0.16, 0.22),
            sleeve_angle=rng.uniform(0.35, 0.75),
            cuff_taper=rng.uniform(0.7, 1.0),
        )
        if category == "top":
            sleeve = str(rng.choice(SLEEVES))
            neckline = str(rng.choice(["round", "v"]))
            shape.update(hem_flare=rng.uniform(-0.02, 0.05), length=rng.uniform(0.7, 0.92))
            maybe("pocket", 0.25)
            maybe("trim", 0.25)
        elif category == "shirt":
            sleeve = str(rng.choice(["short", "long"]))
            neckline = "collar"
            details.append("buttons")
            shape.update(hem_flare=rng.uniform(-0.01, 0.04), length=rng.uniform(0.8, 0.95))
            maybe("pocket", 0.5)
        elif category == "dress":
            sleeve = str(rng.choice(SLEEVES))
            neckline = str(rng.choice(["round", "v"]))
            fit = str(rng.choice(FITS))
            shape.update(
                bodice=rng.uniform(0.28, 0.36),
                waist_in=rng.uniform(0.03, 0.06),
                skirt=rng.uniform(0.3, 0.62),
                hem_flare=rng.uniform(0.1, 0.3) if fit == "flared" else rng.uniform(0.0, 0.05),
            )
            maybe("belt", 0.35)
            maybe("trim", 0.2)
        else:
            sleeve = "long"
            neckline = "v"
            shape.update(hem_flare=rng.uniform(0.0, 0.06), length=rng.uniform(1.0, 1.2), lapel=rng.uniform(0.2, 0.3))
            details.append("buttons")
            maybe("pocket", 0.6)
            maybe("belt", 0.3)
            shape["shoulder"] += 0.03
    elif category in ("trousers", "shorts"):
        fit = str(rng.choice(FITS))
        long = category == "trousers"
        shape.update(
            waist=rng.uniform(0.16, 0.22),
            rise=rng.uniform(0.25, 0.32),
            length=rng.uniform(0.85, 1.0) if long else rng.uniform(0.35, 0.5),
            flare=rng.uniform(0.02, 0.08) if fit == "flared" else rng.uniform(-0.05, 0.0),
            gap=rng.uniform(0.01, 0.05),
        )
        maybe("belt", 0.3)
        maybe("trim", 0.2 if long else 0.35)
    elif category == "skirt":
        fit = str(rng.choice(FITS))
        shape.update(
            waist=rng.uniform(0.16, 0.22),
            length=rng.uniform(0.35, 0.8),
            flare=rng.uniform(0.1, 0.3) if fit == "flared" else rng.uniform(0.01, 0.05),
        )
        maybe("belt", 0.3)
        maybe("trim", 0.3)
    elif category == "shoe":
        style = str(rng.choice(["sneaker", "boot", "heel"]))
        shape.update(height=rng.uniform(0.8, 1.2), toe=rng.uniform(0.85, 1.15), sole=rng.uniform(0.04, 0.08))
        maybe("trim", 0.4)
        if style == "boot":
            maybe("buttons", 0.3)
    else:
        style = str(rng.choice(["tote", "handbag", "clutch"]))
        shape.update(
            width=rng.uniform(0.28, 0.4),
            taper=rng.uniform(0.0, 0.08),
            top=rng.uniform(-0.2, 0.05),
            handle=rng.uniform(0.25, 0.45),
        )
        maybe("pocket", 0.35)
        maybe("trim", 0.3)
        maybe("buttons", 0.25)
    if pattern != "solid" and category in ("shoe",):
        pattern = "solid" if rng.random() < 0.5 else pattern
    return ProductSpec(
        seed=seed,
        category=category,
        colour=colour,
        main_rgb=main,
        second_rgb=second,
        accent_rgb=accent,
        pattern=pattern,
        pattern_scale=float(rng.uniform(0.05, 0.13)),
        pattern_angle=float(rng.choice([0.0, np.pi / 2, np.pi / 4, -np.pi / 4]) + rng.uniform(-0.1, 0.1)),
        pattern_phase=(float(rng.random()), float(rng.random())),
        sleeve=sleeve,
        neckline=neckline,
        fit=fit,
        style=style,
        details=tuple(details),
        shape={k: float(v) for k, v in shape.items()},
    )


def _jitter_colour(rgb: tuple[int, int, int], rng: np.random.Generator, amount: float) -> tuple[int, int, int]:
    """A nearby shade: products of the same named colour still differ (small hue, larger value/saturation)."""
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    h = (h + rng.uniform(-0.025, 0.025) * amount) % 1.0
    s = float(np.clip(s + rng.uniform(-0.15, 0.15) * amount, 0, 1)) if s > 0.15 else s
    v = float(np.clip(v + rng.uniform(-0.12, 0.12) * amount, 0.05, 1))
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


# -------------------------------------------------------------------------------------------- the geometry


@dataclass
class Part:
    """One drawn piece in local coordinates: a filled polygon or a polyline."""

    points: np.ndarray  # (N, 2)
    fill: str  # "main" (patterned), "inner" (dark inside of the garment), "light", "accent", "sole", "line"
    width: float = 0.0  # line width in local units, for fill == "line"


@dataclass
class Shape:
    parts: list[Part]
    landmarks: np.ndarray  # (8, 2) local coordinates
    visibility: np.ndarray  # (8,)


def _mirror(points: np.ndarray) -> np.ndarray:
    return points * np.array([-1.0, 1.0])


def _ellipse(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, end: float = 2 * np.pi) -> np.ndarray:
    angles = np.linspace(start, end, 24)
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def _upper_body(spec: ProductSpec, sleeve_swing: float) -> Shape:
    """Tops, shirts, coats and dresses: body, sleeves, neckline, and the details."""
    s = spec.shape
    y_shoulder = -0.42
    y_neck = y_shoulder - 0.03
    shoulder, neck, armhole = s["shoulder"], s["neck"], s["armhole"]
    armpit = np.array([shoulder - 0.02, y_shoulder + armhole])
    tip = np.array([shoulder, y_shoulder])
    landmarks = np.zeros((8, 2))
    visibility = np.ones(8)
    parts: list[Part] = []

    if spec.category == "dress":
        y_waist = y_shoulder + s["bodice"]
        waist = shoulder - s["waist_in"]
        y_hem = y_waist + s["skirt"]
        hem = waist + s["hem_flare"]
        right = [[neck, y_neck], tip, armpit, [waist, y_waist], [hem, y_hem]]
        landmarks[WAIST_L], landmarks[WAIST_R] = [-waist, y_waist], [waist, y_waist]
    else:
        y_hem = y_shoulder + s["length"]
        hem = shoulder + s["hem_flare"]
        right = [[neck, y_neck], tip, armpit, [hem, y_hem]]
        visibility[[WAIST_L, WAIST_R]] = 0
        y_waist = y_shoulder + 0.45 * s["length"]
    right_half = np.array(right, float)
    body = np.concatenate([_mirror(right_half)[::-1], right_half])

    # Sleeves hang from the armhole (shoulder tip to armpit) at an angle; the cuff is perpendicular to them.
    armhole_mid = (tip + armpit) / 2
    if spec.sleeve in ("short", "long"):
        length = {"short": 0.16, "long": 0.5 if spec.category != "coat" else 0.55}[spec.sleeve]
        angle = s["sleeve_angle"] + sleeve_swing
        direction = np.array([np.sin(angle), np.cos(angle)])
        across = np.array([np.cos(angle), -np.sin(angle)])
        half_cuff = np.linalg.norm(tip - armpit) / 2 * (s["cuff_taper"] if spec.sleeve == "long" else 1.0)
        cuff = armhole_mid + length * direction
        sleeve = np.array([tip, cuff + across * half_cuff, cuff - across * half_cuff, armpit])
        parts += [Part(sleeve, "main"), Part(_mirror(sleeve), "main")]
        landmarks[SLEEVE_R], landmarks[SLEEVE_L] = cuff, cuff * np.array([-1, 1])
        if "trim" in spec.details:
            band = np.array([cuff + across * half_cuff, cuff - across * half_cuff])
            band = np.concatenate([band, band[::-1] - direction * 0.035])
            parts += [Part(band, "accent"), Part(_mirror(band), "accent")]
    else:
        landmarks[SLEEVE_R], landmarks[SLEEVE_L] = armhole_mid, armhole_mid * np.array([-1, 1])
    parts.append(Part(body, "main"))

    depth = {"round": 0.07, "v": 0.17, "collar": 0.06}[spec.neckline or "round"]
    if spec.category == "coat":
        depth = s["lapel"]
    if spec.neckline == "v" or spec.category == "coat":
        opening = np.array([[-neck, y_neck], [neck, y_neck], [0.0, y_neck + depth]])
    else:
        opening = _ellipse(0.0, y_neck, neck, depth, 0.0, np.pi)
    parts.append(Part(opening, "inner"))
    if spec.neckline == "collar" or spec.category == "coat":
        flap = np.array([[neck, y_neck], [0.01, y_neck + depth + 0.04], [neck + 0.05, y_neck + 0.08]])
        if spec.category == "coat":
            flap = np.array([[neck, y_neck], [0.0, y_neck + depth], [neck + 0.06, y_neck + depth * 0.5]])
        parts += [Part(flap, "light"), Part(_mirror(flap), "light")]
    if spec.category == "coat":
        parts.append(Part(np.array([[0.0, y_neck + depth], [0.0, y_hem]]), "line", 0.006))

    if "buttons" in spec.details:
        top = y_neck + depth + 0.04
        x = 0.035 if spec.category == "coat" else 0.0
        for y in np.linspace(top, min(y_hem - 0.06, top + 0.5), 3 if spec.category == "coat" else 5):
            parts.append(Part(_ellipse(x, y, 0.014, 0.014), "accent"))
    if "pocket" in spec.details:
        if spec.category == "coat":
            for sign in (-1, 1):
                x0 = sign * shoulder * 0.35
                parts.append(
                    Part(
                        _rect(min(x0, x0 + sign * 0.12), y_hem - 0.28, max(x0, x0 + sign * 0.12), y_hem - 0.16), "light"
                    )
                )
        else:
            parts.append(Part(_rect(-shoulder * 0.8, y_shoulder + 0.1, -shoulder * 0.35, y_shoulder + 0.2), "light"))
    if "belt" in spec.details:
        half = (waist if spec.category == "dress" else hem * 0.5 + shoulder * 0.5) + 0.005
        parts.append(Part(_rect(-half, y_waist - 0.025, half, y_waist + 0.025), "accent"))
        parts.append(Part(_rect(-0.03, y_waist - 0.035, 0.03, y_waist + 0.035), "sole"))
    if "trim" in spec.details:
        parts.append(Part(np.array([[-hem, y_hem - 0.04], [hem, y_hem - 0.04], [hem, y_hem], [-hem, y_hem]]), "accent"))

    landmarks[COLLAR_L], landmarks[COLLAR_R] = [-neck, y_neck], [neck, y_neck]
    landmarks[HEM_L], landmarks[HEM_R] = [-hem, y_hem], [hem, y_hem]
    return Shape(parts, landmarks, visibility)


def _lower_body(spec: ProductSpec, leg_swing: float) -> Shape:
    """Trousers, shorts and skirts: waistband at the top, hem(s) at the bottom."""
    s = spec.shape
    y_top = -0.5
    waist = s["waist"]
    landmarks = np.zeros((8, 2))
    visibility = np.zeros(8)
    visibility[[WAIST_L, WAIST_R, HEM_L, HEM_R]] = 1
    parts: list[Part] = []
    if spec.category == "skirt":
        y_hem = y_top + s["length"]
        hem = waist + s["flare"] + leg_swing
        parts.append(Part(np.array([[-waist, y_top], [waist, y_top], [hem, y_hem], [-hem, y_hem]]), "main"))
        hem_points = np.array([[-hem, y_hem], [hem, y_hem]])
        trim = np.array([[-hem, y_hem - 0.04], [hem, y_hem - 0.04], [hem, y_hem], [-hem, y_hem]])
        trims = [trim]
    else:
        y_hem = y_top + s["length"]
        y_crotch = y_top + s["rise"]
        outer = waist + s["flare"] + leg_swing
        gap = s["gap"] + leg_swing
        right = np.array([[waist, y_top], [outer, y_hem], [gap, y_hem], [0.0, y_crotch]])
        parts.append(Part(np.concatenate([right, _mirror(right)[:-1][::-1]]), "main"))
        parts.append(Part(np.array([[0.0, y_top + 0.05], [0.0, y_crotch - 0.04]]), "line", 0.006))
        leg_mid = (outer + gap) / 2
        hem_points = np.array([[-leg_mid, y_hem], [leg_mid, y_hem]])
        trim = np.array([[gap, y_hem - 0.04], [outer, y_hem - 0.04], [outer, y_hem], [gap, y_hem]])
        trims = [trim, _mirror(trim)]
    band = "accent" if "belt" in spec.details else "inner"
    parts.append(Part(_rect(-waist, y_top, waist, y_top + 0.05), band))
    if "belt" in spec.details:
        parts.append(Part(_rect(-0.03, y_top - 0.005, 0.03, y_top + 0.055), "sole"))
    if "trim" in spec.details:
        parts += [Part(t, "accent") for t in trims]
    landmarks[WAIST_L], landmarks[WAIST_R] = [-waist, y_top], [waist, y_top]
    landmarks[HEM_L], landmarks[HEM_R] = hem_points
    return Shape(parts, landmarks, visibility)


def _shoe(spec: ProductSpec) -> Shape:
    """Side view, toe to the right, ground at y = 0. Slots: collar = back and front of the opening,
    waistline = top of the heel counter and the toe tip, hem = heel and toe on the ground; no sleeves."""
    s = spec.shape
    t = s["sole"]
    h = s["height"]
    toe = 0.5 * s["toe"]
    if spec.style == "heel":
        # A pump: the foot bed slopes from the raised heel down to the ball of the foot.
        heel_y = -0.24 * h
        sole = np.array([[-0.45, heel_y], [0.12, -0.02], [toe, -0.02], [toe, 0.0], [0.1, 0.0], [-0.3, heel_y + 0.03]])
        block = np.array([[-0.45, heel_y], [-0.37, heel_y + 0.02], [-0.38, 0.0], [-0.43, 0.0]])
        upper = np.array(
            [
                [-0.46, heel_y],
                [-0.47, heel_y - 0.17 * h],
                [-0.33, heel_y - 0.14 * h],
                [0.08, -0.14 * h],
                [0.33, -0.1 * h],
                [toe - 0.02, -0.05],
                [toe, -0.02],
                [0.12, -0.02],
            ]
        )
        parts = [Part(block, "sole"), Part(upper, "main"), Part(sole, "sole")]
        landmarks = np.zeros((8, 2))
        landmarks[COLLAR_L], landmarks[COLLAR_R] = upper[1], upper[3]
        landmarks[WAIST_L], landmarks[WAIST_R] = upper[0], upper[6]
        landmarks[HEM_L], landmarks[HEM_R] = block[3], sole[3]
    else:
        shaft = 0.75 if spec.style == "boot" else 0.32
        sole = np.array(
            [[-0.5, -t], [toe - 0.04, -t], [toe, -t * 0.5], [toe - 0.02, 0.0], [-0.48, 0.0], [-0.5, -t * 0.5]]
        )
        front_of_opening = [-0.12, -0.29 * h] if spec.style == "sneaker" else [-0.2, -shaft * h]
        upper = np.array(
            [
                [-0.49, -t],
                [-0.5, -shaft * h],
                [-0.4, -(shaft + 0.02) * h],
                front_of_opening,
                [-0.08, -0.33 * h] if spec.style == "sneaker" else [-0.14, -0.3 * h],
                [0.15, -0.21 * h],
                [0.38, -0.13 * h],
                [toe, -0.06 * h - t],
                [toe - 0.01, -t],
            ]
        )
        parts = [Part(upper, "main"), Part(sole, "sole")]
        landmarks = np.zeros((8, 2))
        landmarks[COLLAR_L], landmarks[COLLAR_R] = upper[2], upper[3]
        landmarks[WAIST_L], landmarks[WAIST_R] = upper[0], upper[7]
        landmarks[HEM_L], landmarks[HEM_R] = sole[4], sole[3]
        if spec.style == "sneaker":
            for i in range(4):
                x, y = -0.1 + 0.07 * i, (-0.3 + 0.025 * i) * h
                parts.append(Part(np.array([[x - 0.03, y + 0.01], [x + 0.03, y + 0.04]]), "line", 0.012))
    if "trim" in spec.details:
        stripe = np.array([[-0.3, -t - 0.02], [0.05, -t - 0.1 * h], [0.1, -t - 0.08 * h], [-0.22, -t - 0.0]])
        parts.append(Part(stripe, "accent"))
    if "buttons" in spec.details:
        for y in np.linspace(-0.65 * h, -0.3 * h, 4):
            parts.append(Part(_ellipse(-0.22, y, 0.014, 0.014), "accent"))
    visibility = np.ones(8)
    visibility[[SLEEVE_L, SLEEVE_R]] = 0
    return Shape(parts, landmarks, visibility)


def _bag(spec: ProductSpec) -> Shape:
    """Front view. Slots: collar = where the handle meets the body, waistline = top corners, hem = bottom
    corners; a clutch has no handle (collar invisible); no sleeves."""
    s = spec.shape
    width, y_top, y_bottom = s["width"], s["top"], 0.4
    bottom = width + s["taper"]
    body = np.array([[-width, y_top], [width, y_top], [bottom, y_bottom], [-bottom, y_bottom]])
    parts: list[Part] = []
    landmarks = np.zeros((8, 2))
    visibility = np.ones(8)
    visibility[[SLEEVE_L, SLEEVE_R]] = 0
    if spec.style == "clutch":
        visibility[[COLLAR_L, COLLAR_R]] = 0
    else:
        attach = width * (0.55 if spec.style == "tote" else 0.4)
        height = s["handle"]
        arc = _ellipse(0.0, y_top, attach, height, np.pi, 2 * np.pi)
        parts.append(Part(arc, "line", 0.035 if spec.style == "tote" else 0.025))
        landmarks[COLLAR_L], landmarks[COLLAR_R] = [-attach, y_top], [attach, y_top]
    parts.append(Part(body, "main"))
    if spec.style in ("clutch", "handbag"):
        flap = np.array(
            [
                [-width, y_top],
                [width, y_top],
                [width * 0.9, y_top + 0.12],
                [0.0, y_top + 0.2],
                [-width * 0.9, y_top + 0.12],
            ]
        )
        parts.append(Part(flap, "light"))
    if "pocket" in spec.details:
        parts.append(Part(_rect(-width * 0.5, y_bottom - 0.2, width * 0.5, y_bottom - 0.06), "light"))
    if "trim" in spec.details:
        parts.append(
            Part(
                np.array(
                    [[-bottom, y_bottom - 0.04], [bottom, y_bottom - 0.04], [bottom, y_bottom], [-bottom, y_bottom]]
                ),
                "accent",
            )
        )
    if "buttons" in spec.details:
        parts.append(Part(_ellipse(0.0, y_top + 0.15, 0.025, 0.025), "accent"))
    landmarks[WAIST_L], landmarks[WAIST_R] = [-width, y_top], [width, y_top]
    landmarks[HEM_L], landmarks[HEM_R] = [-bottom, y_bottom], [bottom, y_bottom]
    return Shape(parts, landmarks, visibility)


def product_shape(spec: ProductSpec, swing: float = 0.0) -> Shape:
    """The product's parts and landmarks in local coordinates; `swing` moves sleeves/legs (a pose change)."""
    if spec.category in ("top", "shirt", "dress", "coat"):
        return _upper_body(spec, swing)
    if spec.category in ("trousers", "shorts", "skirt"):
        return _lower_body(spec, swing * 0.1)
    if spec.category == "shoe":
        return _shoe(spec)
    return _bag(spec)


# --------------------------------------------------------------------------------------------- the drawing


def _pattern_layer(spec: ProductSpec, local_x: np.ndarray, local_y: np.ndarray) -> np.ndarray:
    """(H, W, 3) float colours of the patterned fabric at the given local coordinates."""
    main = np.array(spec.main_rgb, np.float32)
    second = np.array(spec.second_rgb, np.float32)
    period = spec.pattern_scale
    cos, sin = np.cos(spec.pattern_angle), np.sin(spec.pattern_angle)
    u = (local_x * cos + local_y * sin) / period + spec.pattern_phase[0]
    v = (-local_x * sin + local_y * cos) / period + spec.pattern_phase[1]
    weight = np.zeros(local_x.shape, np.float32)
    if spec.pattern == "stripes":
        weight = ((u % 1.0) < 0.4).astype(np.float32)
    elif spec.pattern == "dots":
        du, dv = (u % 1.0) - 0.5, (v % 1.0) - 0.5
        weight = (du * du + dv * dv < 0.3**2).astype(np.float32)
    elif spec.pattern == "checks":
        weight = 0.55 * ((u % 1.0) < 0.45) + 0.55 * ((v % 1.0) < 0.45)
        weight = np.clip(weight, 0, 1).astype(np.float32)
    elif spec.pattern == "print":
        # Scattered diamonds, present in a pseudo-random half of the cells (a hash of the cell index).
        cell_u, cell_v = np.floor(u * 0.7), np.floor(v * 0.7)
        present = ((cell_u * 73856093 + cell_v * 19349663 + spec.seed) % 7) < 3
        du, dv = np.abs((u * 0.7) % 1.0 - 0.5), np.abs((v * 0.7) % 1.0 - 0.5)
        weight = (present & (du + dv < 0.32)).astype(np.float32)
    return main * (1 - weight[..., None]) + second * weight[..., None]


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb)  # type: ignore[return-value]


def _lighten(rgb: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    return tuple(int(c + (255 - c) * amount) for c in rgb)  # type: ignore[return-value]


@dataclass(frozen=True)
class Pose:
    """Where the item sits in the frame: local -> canvas is scale * rotation + centre."""

    scale: float  # canvas pixels per local unit
    angle: float  # radians
    centre: tuple[float, float]  # canvas pixels

    def matrix(self) -> np.ndarray:
        cos, sin = np.cos(self.angle) * self.scale, np.sin(self.angle) * self.scale
        return np.array([[cos, -sin, self.centre[0]], [sin, cos, self.centre[1]], [0.0, 0.0, 1.0]])

    def apply(self, points: np.ndarray) -> np.ndarray:
        return points @ self.matrix()[:2, :2].T + self.matrix()[:2, 2]


def _fit_pose(shape: Shape, canvas: int, fill: float, angle: float, shift: tuple[float, float]) -> Pose:
    """Scale the item so its longer side is `fill` of the canvas and centre it (plus `shift`)."""
    points = np.concatenate([p.points for p in shape.parts])
    lo, hi = points.min(axis=0), points.max(axis=0)
    scale = fill * canvas / float(max(hi - lo))
    middle = (lo + hi) / 2
    cos, sin = np.cos(angle), np.sin(angle)
    offset = np.array([[cos, -sin], [sin, cos]]) @ middle * scale
    centre = (canvas / 2 + shift[0] * canvas - offset[0], canvas / 2 + shift[1] * canvas - offset[1])
    return Pose(scale=scale, angle=angle, centre=centre)


def render_product(spec: ProductSpec | int, view: int = 0, size: int = RENDER_SIZE) -> Record:
    """One catalog photo of a product: view 0 is the canonical studio shot, other views vary pose and backdrop."""
    if not isinstance(spec, ProductSpec):
        spec = product_spec(spec)
    rng = np.random.default_rng([spec.seed, view, 0xC0FFEE])
    canvas = size * SUPERSAMPLE
    if view == 0:
        swing, angle, fill, shift = 0.0, 0.0, ITEM_FILL, (0.0, 0.0)
        background = random_background((canvas, canvas), rng, "plain")
    else:
        swing = rng.uniform(-0.12, 0.12)
        angle = np.deg2rad(rng.uniform(-7, 7))
        fill = ITEM_FILL * rng.uniform(0.88, 1.05)
        shift = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
        background = random_background((canvas, canvas), rng, str(rng.choice(["plain", "gradient", "texture"])))
        if np.asarray(background).mean() < 110:  # keep studio-like backdrops light enough to see dark items
            background = Image.blend(background, Image.new("RGB", background.size, (235, 235, 235)), 0.6)
    shape = product_shape(spec, swing)
    pose = _fit_pose(shape, canvas, fill, angle, shift)

    # Local coordinates of every canvas pixel centre, for the fabric pattern.
    inverse = np.linalg.inv(pose.matrix())
    ys, xs = np.mgrid[0:canvas, 0:canvas].astype(np.float32) + 0.5
    local_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    local_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    fabric = _pattern_layer(spec, local_x, local_y)
    # Soft light from the top left gives the flat drawing some volume.
    light = 1.06 - 0.14 * np.clip((local_x + local_y + 1.0) / 2.0, 0, 1)
    fabric_image = Image.fromarray(np.clip(fabric * light[..., None], 0, 255).astype(np.uint8))

    image = background.copy()
    draw = ImageDraw.Draw(image)
    mask = Image.new("L", (canvas, canvas), 0)
    mask_draw = ImageDraw.Draw(mask)
    outline = _shade(spec.main_rgb, 0.6) if sum(spec.main_rgb) > 150 else _lighten(spec.main_rgb, 0.25)
    colours = {
        "inner": _shade(spec.main_rgb, 0.45),
        "light": _lighten(spec.main_rgb, 0.2) if sum(spec.main_rgb) < 600 else _shade(spec.main_rgb, 0.9),
        "accent": spec.accent_rgb,
        "sole": _lighten(spec.accent_rgb, 0.6),
        "line": _shade(spec.accent_rgb, 0.8),
    }
    outline_width = max(1, round(0.006 * pose.scale))
    for part in shape.parts:
        points = [tuple(p) for p in pose.apply(part.points)]
        if part.fill == "line":
            width = max(1, round(part.width * pose.scale))
            draw.line(points, fill=colours["line"], width=width, joint="curve")
            mask_draw.line(points, fill=255, width=width, joint="curve")
            continue
        if part.fill == "main":
            part_mask = Image.new("L", (canvas, canvas), 0)
            ImageDraw.Draw(part_mask).polygon(points, fill=255)
            image.paste(fabric_image, (0, 0), part_mask)
        else:
            draw.polygon(points, fill=colours[part.fill])
        draw.polygon(points, outline=outline, width=outline_width)
        mask_draw.polygon(points, fill=255)

    image = image.resize((size, size), Image.Resampling.LANCZOS)
    mask = mask.resize((size, size), Image.Resampling.BILINEAR)
    landmarks = (pose.apply(shape.landmarks) / canvas).astype(np.float32)
    visibility = shape.visibility.astype(np.float32)
    landmarks[visibility == 0] = 0.0  # slots this category does not have
    return Record(
        image=image,
        instance_id=spec.seed,
        category=CATEGORIES.index(spec.category),
        attributes=attribute_vector(spec.attribute_names),
        landmarks=landmarks,
        visibility=visibility,
        extra={
            "source": "render",
            "seed": spec.seed,
            "view": view,
            "mask": mask,
            "bbox": mask_bbox(mask),
            "title": spec.title,
        },
    )


class RenderedProducts(Sequence[Record]):
    """`num_products` rendered products x `views_per_product` catalog photos each, rendered on access.

    Index i is product `first_seed + i // views_per_product`, view `i % views_per_product`. The `split`
    picks a disjoint seed range ("train" or "eval") unless `first_seed` is given.
    """

    label_space = LABEL_SPACE

    def __init__(
        self,
        num_products: int,
        views_per_product: int = 1,
        size: int = RENDER_SIZE,
        split: str = "train",
        first_seed: int | None = None,
    ) -> None:
        if first_seed is None:
            first_seed = {"train": TRAIN_FIRST_SEED, "eval": EVAL_FIRST_SEED}[split]
        self.num_products = num_products
        self.views_per_product = views_per_product
        self.size = size
        self.first_seed = first_seed

    def __len__(self) -> int:
        return self.num_products * self.views_per_product

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        product, view = divmod(index, self.views_per_product)
        return render_product(self.first_seed + product, view, self.size)

    @property
    def instance_ids(self) -> np.ndarray:
        """Instance id of every index, without rendering (for the P x K sampler)."""
        return np.repeat(np.arange(self.num_products) + self.first_seed, self.views_per_product)
