"""Version 0 for tests that need a real network: fitted on a few rendered products at 64 px (seconds, not minutes)
and exported to ONNX beside its checkpoint, as the worker that fits a version does."""

from __future__ import annotations

import io

from PIL import Image

from catalog import query_payload
from catalog.models import ModelVersion
from workers.ml.baseline import fit_baseline
from workers.ml.datasets.render import render_product

PRODUCTS = 10


def photos(count: int, *, view: int = 0, offset: int = 0) -> list[Image.Image]:
    return [render_product(seed + offset, view=view).image.convert("RGB") for seed in range(count)]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def as_sent(image: Image.Image) -> Image.Image:
    """The photo a worker decodes from the small JPEG the web sends it."""
    return Image.open(io.BytesIO(query_payload.photo_jpeg(image))).convert("RGB")


def fitted_version(folder, *, name: str, seed: int = 0, export: bool = True, input_size: int = 64) -> ModelVersion:
    """Version 0 fitted on rendered products (64 px input: seconds, not minutes; 224 px, the served size, where a
    test needs the 7 x 7 activation map of item boxes), exported to ONNX beside its checkpoint as the worker that
    fits a version does (workers.encoders), and registered READY."""
    from workers.encoders import onnx_export_for

    checkpoint = fit_baseline(
        photos(PRODUCTS, offset=seed), out_path=folder / f"{name}.pt", code_bits=32, fc7_dim=8, input_size=input_size,
        seed=seed,
    )  # fmt: skip
    if export:
        assert onnx_export_for(checkpoint) == checkpoint.with_suffix(".onnx")
    return ModelVersion.objects.create(
        name=name, checkpoint=str(checkpoint), code_bits=32, fc7_dim=8, status=ModelVersion.Status.READY
    )
