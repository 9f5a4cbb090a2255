"""An exported model version run by ONNX Runtime (the Encoder's network for .onnx files), and the checkpoint
metadata an export carries.

The .onnx file is as self-describing as the checkpoint it came from: the checkpoint's metadata (model config,
vocabularies, preprocessing, sizes, metrics; no weights) rides along as JSON in the model's metadata_props, so
a process needs just the one file, and no torch. The graph takes a preprocessed float batch (N, 3, S, S) with a
dynamic batch axis and returns the heads the network has, named as in `encoder.HEAD_NAMES`; preprocessing and
bit packing stay in Python (inference.preprocess, inference.encoder). workers.ml.export writes these files, and
records which checkpoint file each was made from (`checkpoint_source`), so a stale export is never used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from inference.checkpoint import FORMAT_VERSION, KINDS
from inference.encoder import network_result

INPUT_NAME = "images"
METADATA_KEY = "shop_search.checkpoint"
SOURCE_KEY = "shop_search.source"  # which checkpoint file (size, mtime) and export code made this graph
# bump when the graph's inputs or outputs change: older exports are then made again (2: the activation map)
EXPORT_FORMAT = 2


def checkpoint_source(checkpoint_path: Path) -> dict:
    """What identifies the checkpoint file an export was made from (and the export code's format)."""
    stat = Path(checkpoint_path).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "export_format": EXPORT_FORMAT}


def metadata_props(onnx_path: str | Path) -> dict[str, str]:
    """The key/value metadata of an .onnx file (read without its weights' external data)."""
    import onnx  # the exporter's package: only workers.ml.export reads files without running them

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
        props = self.session.get_modelmeta().custom_metadata_map
        self.checkpoint_metadata = _checkpoint_metadata(props, onnx_path)
        self.source: dict | None = json.loads(props.get(SOURCE_KEY, "null"))

    def exported_from(self, checkpoint_path: Path) -> bool:
        """Was this graph exported, by this export format, from the checkpoint file as it is now?"""
        return self.source == checkpoint_source(checkpoint_path)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})
        return dict(zip(self.output_names, values))

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray | None]:
        return network_result(self.run(batch))
