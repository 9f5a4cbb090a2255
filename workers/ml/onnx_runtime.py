"""An exported model version run by ONNX Runtime (the Encoder's network for .onnx files), and the checkpoint
metadata an export carries.

The .onnx file is as self-describing as the checkpoint it came from: the checkpoint's metadata (model config,
vocabularies, preprocessing, sizes, metrics; no weights) rides along as JSON in the model's metadata_props, so
a worker needs just the one file. The graph takes a preprocessed float batch (N, 3, S, S) with a dynamic batch
axis and returns the heads the network has, named as in `heads.HEAD_NAMES`; preprocessing and bit packing
stay in Python, shared with the torch path. workers.ml.export writes these files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch

from workers.ml.checkpoint import FORMAT_VERSION, KINDS
from workers.ml.heads import network_result

INPUT_NAME = "images"
METADATA_KEY = "shop_search.checkpoint"


def metadata_props(onnx_path: str | Path) -> dict[str, str]:
    """The key/value metadata of an .onnx file (read without its weights' external data)."""
    graph = onnx.load(str(onnx_path), load_external_data=False)
    return {prop.key: prop.value for prop in graph.metadata_props}


def _checkpoint_metadata(props: dict[str, str], onnx_path: str | Path) -> dict:
    """The checkpoint metadata stored in an exported .onnx file, checked like load_checkpoint checks a .pt."""
    if METADATA_KEY not in props:
        raise ValueError(f"{onnx_path}: not exported by workers.ml.export (no {METADATA_KEY} metadata)")
    metadata = json.loads(props[METADATA_KEY])
    if metadata.get("format_version") != FORMAT_VERSION or metadata.get("kind") not in KINDS:
        raise ValueError(
            f"{onnx_path}: checkpoint format {metadata.get('format_version')!r} / kind {metadata.get('kind')!r}, "
            f"this code reads format {FORMAT_VERSION} and kinds {KINDS}"
        )
    return metadata


class OnnxNetwork:
    """An exported network run by ONNX Runtime on the CPU; the Encoder's network for .onnx files."""

    def __init__(self, onnx_path: str | Path, *, num_threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.output_names = [output.name for output in self.session.get_outputs()]
        # read from the session ONNX Runtime already parsed, not by parsing the file a second time
        self.checkpoint_metadata = _checkpoint_metadata(self.session.get_modelmeta().custom_metadata_map, onnx_path)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(self.output_names, values))

    def __call__(self, batch: torch.Tensor) -> dict[str, np.ndarray | None]:
        return network_result(self.run(batch.numpy()))
