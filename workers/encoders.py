"""The process-wide Encoder of a worker: each checkpoint is loaded once, lazily, behind a lock.

Imported only inside task bodies, so that web processes (which import workers.tasks to enqueue) never load torch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from workers.ml.encoder import Encoder

# One intra-op thread per worker process: throughput comes from processes (one per core), not from threads
# fighting over the same cores.
WORKER_TORCH_THREADS = int(os.environ.get("WORKER_TORCH_THREADS", "1"))

_lock = threading.Lock()
_encoders: dict[Path, Encoder] = {}


def encoder_for(checkpoint: str | Path) -> Encoder:
    path = Path(checkpoint).resolve()
    with _lock:
        if path not in _encoders:
            _encoders[path] = Encoder.load(path, num_threads=WORKER_TORCH_THREADS)
        return _encoders[path]
