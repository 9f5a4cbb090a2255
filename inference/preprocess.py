"""Image preprocessing shared by training, the workers' Encoder and the web's, driven by the checkpoint's
`preprocessing` dict. numpy only: workers.ml.preprocess wraps the arrays in torch tensors for training.

Images are letterboxed: scaled so the longer side equals `input_size`, centred, padded with the mean colour
(which normalises to exactly 0). Products keep their aspect ratio, and landmark coordinates map back to the
original image with `Letterbox.to_original`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Preprocessing:
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"input_size": self.input_size, "mean": list(self.mean), "std": list(self.std), "resize": "letterbox"}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        mean, std = [float(v) for v in data["mean"]], [float(v) for v in data["std"]]
        return cls(int(data["input_size"]), (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))


@dataclass(frozen=True)
class Letterbox:
    """Where the original image sits inside the square input, in input-normalised [0, 1] units."""

    offset_x: float
    offset_y: float
    scale_x: float  # width of the original image as a fraction of the input side
    scale_y: float

    def to_input(self, points: np.ndarray) -> np.ndarray:
        """(…, 2) x/y normalised to the original image -> normalised to the square input."""
        points = np.asarray(points, dtype=np.float32)
        return np.stack(
            [points[..., 0] * self.scale_x + self.offset_x, points[..., 1] * self.scale_y + self.offset_y], axis=-1
        )

    def to_original(self, points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float32)
        return np.stack(
            [(points[..., 0] - self.offset_x) / self.scale_x, (points[..., 1] - self.offset_y) / self.scale_y],
            axis=-1,
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK and RGBA (composited on white, like a product page) -> RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def letterbox(image: Image.Image, prep: Preprocessing) -> tuple[Image.Image, Letterbox]:
    image = to_rgb(image)
    width, height = image.size
    side = prep.input_size
    scale = side / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    fill = tuple(int(round(m * 255)) for m in prep.mean)
    canvas = Image.new("RGB", (side, side), fill)
    left, top = (side - new_w) // 2, (side - new_h) // 2
    canvas.paste(resized, (left, top))
    return canvas, Letterbox(left / side, top / side, new_w / side, new_h / side)


def to_array(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """A square RGB PIL image of input_size -> normalised (3, S, S) float32 array."""
    pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
    normalised = (pixels - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def preprocess(image: Image.Image, prep: Preprocessing) -> tuple[np.ndarray, Letterbox]:
    boxed, box = letterbox(image, prep)
    return to_array(boxed, prep), box


def preprocess_batch(images: Sequence[Image.Image], prep: Preprocessing) -> tuple[np.ndarray, list[Letterbox]]:
    """(N, 3, S, S) float32 and each image's letterbox."""
    if not images:
        return np.zeros((0, 3, prep.input_size, prep.input_size), np.float32), []
    arrays, boxes = zip(*(preprocess(image, prep) for image in images))
    return np.stack(arrays), list(boxes)
