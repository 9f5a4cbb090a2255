"""Image preprocessing as torch tensors, for training and the torch networks. The preprocessing itself (letterbox,
normalisation) is inference.preprocess, shared with the web process's ONNX encoder; this module only wraps its
arrays in tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from inference import preprocess as _arrays
from inference.preprocess import Letterbox as Letterbox
from inference.preprocess import Preprocessing as Preprocessing
from inference.preprocess import letterbox as letterbox
from inference.preprocess import to_rgb as to_rgb


def to_tensor(image: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """A square RGB PIL image of input_size -> normalised (3, S, S) float32 tensor."""
    return torch.from_numpy(_arrays.to_array(image, prep))


def preprocess(image: Image.Image, prep: Preprocessing) -> tuple[torch.Tensor, Letterbox]:
    array, box = _arrays.preprocess(image, prep)
    return torch.from_numpy(array), box


def preprocess_batch(images: Sequence[Image.Image], prep: Preprocessing) -> tuple[torch.Tensor, list[Letterbox]]:
    batch, boxes = _arrays.preprocess_batch(images, prep)
    return torch.from_numpy(batch), boxes
