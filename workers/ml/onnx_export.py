"""Command line: export a model version (a trained FashionNet or version 0) to ONNX and time it.

    python -m workers.ml.onnx_export var/models/v3.pt           # -> var/models/v3.onnx, checked against torch
    python -m workers.ml.onnx_export var/models/v3.pt --bench   # then time torch and ONNX Runtime encoders
    Encoder.load("var/models/v3.onnx")                          # the same Encoding, computed by ONNX Runtime

The exporter itself is workers.ml.export (what workers call, workers/encoders.py); the file's contents and the
runner are in inference.onnx_runtime.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from workers.ml.encoder import Encoder
from workers.ml.export import export


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
