"""The process-wide Encoder of a worker: each checkpoint is loaded once, lazily, behind a lock.

Model versions run on ONNX Runtime by default (WORKER_ENCODER_RUNTIME=onnx), one thread each: measured per
image, preprocessing included, a trained FashionNet (48 px) is ~4x faster than torch for a single shopper photo
and 2x in batches of 64; version 0 (112 px) 2.9x and 2.65x (`python -m workers.ml.onnx_export MODEL.pt --bench`).
The .onnx file is exported beside the checkpoint the first time any worker needs it (the worker that fitted or
trained the version, right away) and exported again when the checkpoint changes (the export records the size
and modification time of the checkpoint file it came from). If the export cannot be made, the worker logs why
and runs the checkpoint on torch: a slower search beats no search.

Only worker processes import this module, and only on first use (workers.pipelines.encoder_at imports it inside
the function): web processes never import workers at all (catalog.dispatch enqueues tasks by name), so they
never load torch.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from workers.ml.encoder import Encoder

logger = logging.getLogger(__name__)

# One intra-op thread per worker process: throughput comes from processes (one per core), not from threads
# fighting over the same cores. Applies to torch and to ONNX Runtime.
WORKER_TORCH_THREADS = int(os.environ.get("WORKER_TORCH_THREADS", "1"))
RUNTIMES = ("onnx", "torch")
WORKER_ENCODER_RUNTIME = os.environ.get("WORKER_ENCODER_RUNTIME", "onnx")
if WORKER_ENCODER_RUNTIME not in RUNTIMES:
    raise ValueError(f"WORKER_ENCODER_RUNTIME must be one of {RUNTIMES}, got {WORKER_ENCODER_RUNTIME!r}")

_lock = threading.Lock()
_encoders: dict[Path, Encoder] = {}


def encoder_for(checkpoint: str | Path) -> Encoder:
    path = Path(checkpoint).resolve()
    with _lock:
        if path not in _encoders:
            _encoders[path] = _load(path, WORKER_ENCODER_RUNTIME)
        return _encoders[path]


def _load(path: Path, runtime: str) -> Encoder:
    if runtime == "onnx":
        onnx_path = onnx_export_for(path)
        if onnx_path is not None:
            return Encoder.load(onnx_path, num_threads=WORKER_TORCH_THREADS)
    return Encoder.load(path, num_threads=WORKER_TORCH_THREADS)


def onnx_export_for(checkpoint: Path) -> Path | None:
    """The up-to-date ONNX export of a checkpoint (made now if missing or stale), or None if it cannot be made."""
    from workers.ml.export import export, is_current_export

    onnx_path = checkpoint.with_suffix(".onnx")
    if is_current_export(onnx_path, checkpoint):
        return onnx_path
    try:
        return export(checkpoint, onnx_path, num_threads=WORKER_TORCH_THREADS)
    except SoftTimeLimitExceeded:  # the task's time is up: that is not an exporter problem
        raise
    except Exception:  # an exporter gap must not stop search: torch computes the same encoding
        logger.exception("ONNX export of %s failed; encoding with torch instead", checkpoint)
        return None
