"""ONNX export of a model version (a trained FashionNet or version 0), checked against torch.

    export("var/models/v3.pt")          # -> var/models/v3.onnx, with the checkpoint's metadata inside
    is_current_export(onnx, checkpoint) # was this .onnx made from the checkpoint file as it is now?

What the file holds and how it runs (without torch): inference.onnx_runtime. The command line (and a speed
comparison) is `python -m workers.ml.onnx_export`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import torch
from torch import nn

from inference.onnx_runtime import (
    INPUT_NAME,
    METADATA_KEY,
    SOURCE_KEY,
    OnnxNetwork,
    checkpoint_source,
    metadata_props,
)
from workers.ml.checkpoint import checkpoint_metadata, load_checkpoint
from workers.ml.heads import heads_module

ABANDONED_TEMPORARY_SECONDS = 3600  # an export takes seconds; a temp file this old belongs to a killed process
OPSET = 18
# Largest |difference| between any ONNX Runtime output and torch's that `export` accepts (both are float32;
# the graph optimiser reorders sums, so the last bits differ).
OUTPUT_TOLERANCE = 1e-4


class _HeadTuple(nn.Module):
    """A heads module -> a flat tuple of its head tensors, in its own order (named by the export)."""

    def __init__(self, heads: nn.Module) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.heads(images).values())


def export(
    checkpoint_path: str | Path,
    out_path: str | Path | None = None,
    *,
    verify: bool = True,
    num_threads: int | None = None,
) -> Path:
    """Write `<checkpoint>.onnx` (or `out_path`) for a checkpoint of either kind; with `verify`, compare with torch
    (ONNX Runtime on `num_threads` threads, default: its own choice)."""
    source = checkpoint_source(Path(checkpoint_path))  # before reading: a checkpoint replaced meanwhile is stale
    checkpoint = load_checkpoint(checkpoint_path)
    out_path = Path(out_path) if out_path else Path(checkpoint_path).with_suffix(".onnx")
    module = heads_module(checkpoint)
    size = int(checkpoint["preprocessing"]["input_size"])
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        names = list(module(example))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(out_path)
    # Written under a unique name and renamed once checked: a worker never loads half a file or an unchecked
    # one, and workers (on any host sharing the folder) exporting the same checkpoint do not trip over each other.
    handle, temporary_name = tempfile.mkstemp(dir=out_path.parent, prefix=f"{out_path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        program = torch.onnx.export(
            _HeadTuple(module).eval(),
            (example,),
            input_names=[INPUT_NAME],
            output_names=names,
            opset_version=OPSET,
            dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=4096)}},
            dynamo=True,
            external_data=False,
            verbose=False,  # the exporter's step-by-step report would land in worker logs and progress bars
        )
        assert program is not None  # the dynamo exporter always returns its ONNXProgram
        graph = program.model_proto
        onnx.helper.set_model_props(
            graph, {METADATA_KEY: json.dumps(checkpoint_metadata(checkpoint)), SOURCE_KEY: json.dumps(source)}
        )
        onnx.save(graph, str(temporary))
        if verify:
            _verify(module, temporary, size, num_threads)
        temporary.replace(out_path)
    finally:
        temporary.unlink(missing_ok=True)
    return out_path


def _remove_abandoned_temporaries(out_path: Path) -> None:
    """Temp files of exports whose process was killed mid-way; old enough that no live export still writes them."""
    for temporary in out_path.parent.glob(f"{out_path.name}.*.tmp"):
        try:
            if time.time() - temporary.stat().st_mtime > ABANDONED_TEMPORARY_SECONDS:
                temporary.unlink(missing_ok=True)
        except FileNotFoundError:  # another worker removed it first
            continue


def is_current_export(onnx_path: Path, checkpoint_path: Path) -> bool:
    """True if `onnx_path` exists and was exported, by this export format, from the checkpoint file as it is now."""
    if not onnx_path.exists():
        return False
    try:
        source = json.loads(metadata_props(onnx_path).get(SOURCE_KEY, "null"))
    except (OSError, ValueError, google.protobuf.message.DecodeError):  # unreadable: export it again
        return False
    return source == checkpoint_source(checkpoint_path)


def _verify(module: nn.Module, onnx_path: Path, size: int, num_threads: int | None) -> None:
    """Compare ONNX Runtime with torch on a fresh batch of another size than the export example."""
    batch = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(1)) * 4 - 2
    with torch.no_grad():
        expected = {name: value.numpy() for name, value in module(batch).items()}
    actual = OnnxNetwork(onnx_path, num_threads=num_threads).run(batch.numpy())
    for name, value in expected.items():
        difference = float(np.abs(actual[name] - value).max())
        if difference > OUTPUT_TOLERANCE:
            raise RuntimeError(f"{onnx_path}: ONNX Runtime's {name} differs from torch by {difference:.2e}")
