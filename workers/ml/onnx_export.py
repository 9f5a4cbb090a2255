"""ONNX export of a model version (a trained FashionNet or version 0), and the ONNX Runtime network the
Encoder runs it with.

    python -m workers.ml.onnx_export var/models/v3.pt           # -> var/models/v3.onnx, checked against torch
    Encoder.load("var/models/v3.onnx")                          # the same Encoding, computed by ONNX Runtime

The .onnx file is as self-describing as the checkpoint it came from: the checkpoint's metadata (model config,
vocabularies, preprocessing, sizes, metrics; no weights) rides along as JSON in the model's metadata_props, so
a worker needs just the one file. The graph takes a preprocessed float batch (N, 3, S, S) with a dynamic batch
axis and returns the heads the network has, named as in `encoder.HEAD_NAMES`; preprocessing and bit packing
stay in Python, shared with the torch path. Workers run these files by default (workers/encoders.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import google.protobuf.message
import numpy as np
import onnx
import torch
from PIL import Image
from torch import nn

from workers.ml.checkpoint import FORMAT_VERSION, KINDS, checkpoint_metadata, load_checkpoint
from workers.ml.encoder import Encoder, heads_module, network_result

INPUT_NAME = "images"
METADATA_KEY = "shop_search.checkpoint"
SOURCE_KEY = "shop_search.source"  # which checkpoint file (size, mtime) and export code made this graph
ABANDONED_TEMPORARY_SECONDS = 3600  # an export takes seconds; a temp file this old belongs to a killed process
EXPORT_FORMAT = 1  # bump when the graph's inputs or outputs change: older exports are then made again
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


def checkpoint_source(checkpoint_path: Path) -> dict:
    """What identifies the checkpoint file an export was made from (and the export code's format)."""
    stat = checkpoint_path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "export_format": EXPORT_FORMAT}


def is_current_export(onnx_path: Path, checkpoint_path: Path) -> bool:
    """True if `onnx_path` exists and was exported, by this export format, from the checkpoint file as it is now."""
    if not onnx_path.exists():
        return False
    try:
        source = json.loads(_metadata_props(onnx_path).get(SOURCE_KEY, "null"))
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


def _metadata_props(onnx_path: str | Path) -> dict[str, str]:
    graph = onnx.load(str(onnx_path), load_external_data=False)
    return {prop.key: prop.value for prop in graph.metadata_props}


def read_metadata(onnx_path: str | Path) -> dict:
    """The checkpoint metadata stored in an exported .onnx file, checked like load_checkpoint checks a .pt."""
    return _checkpoint_metadata(_metadata_props(onnx_path), onnx_path)


def _checkpoint_metadata(props: dict[str, str], onnx_path: str | Path) -> dict:
    if METADATA_KEY not in props:
        raise ValueError(f"{onnx_path}: not exported by workers.ml.onnx_export (no {METADATA_KEY} metadata)")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint (.pt) of either kind")
    parser.add_argument("--out", type=Path, help="where to write the .onnx (default: beside the checkpoint)")
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch comparison")
    parser.add_argument("--bench", action="store_true", help="then time torch and ONNX Runtime encoders")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for --bench (a worker uses 1)")
    args = parser.parse_args(argv)
    path = export(args.checkpoint, args.out, verify=not args.no_verify)
    sys.stdout.write(f"{path}\n")
    if args.bench:
        for batch_size in (1, 64):
            torch_ms, onnx_ms = compare_speed(args.checkpoint, path, batch_size=batch_size, threads=args.threads)
            sys.stdout.write(
                f"batch {batch_size:>2}: torch {torch_ms:.2f} ms/image, onnxruntime {onnx_ms:.2f} ms/image "
                f"(median of repeats; torch/onnxruntime = {torch_ms / onnx_ms:.2f})\n"
            )
    return 0


def compare_speed(
    checkpoint_path: Path, onnx_path: Path, *, batch_size: int, threads: int, repeats: int = 15
) -> tuple[float, float]:
    """Median milliseconds per image of Encoder.encode (preprocessing included) for the .pt and the .onnx."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (300, 220, 3), dtype=np.uint8)) for _ in range(batch_size)]
    medians = []
    for path in (checkpoint_path, onnx_path):
        encoder = Encoder.load(path, num_threads=threads)
        encoder.encode(images)  # warm-up: allocations, lazy initialisation
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            encoder.encode(images)
            timings.append((time.perf_counter() - started) * 1000 / batch_size)
        medians.append(float(np.median(timings)))
    return medians[0], medians[1]


if __name__ == "__main__":
    raise SystemExit(main())
