"""Self-describing checkpoints: everything the Encoder needs, in plain types and tensors.

Loadable with `torch.load(path, weights_only=True)`: no pickled classes, so a checkpoint from an untrusted
source cannot run code, and one written today loads after the Python classes have changed.

Keys: format_version, kind ("fashionnet" | "baseline"), created_at, model_config, label_space,
preprocessing {input_size, mean, std, resize}, code_bits, fc7_dim, metrics, state_dict, and for a resumable
training checkpoint also training {epoch, optimizer, rng, config, ...}.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import torch

from inference.checkpoint import FORMAT_VERSION, KINDS


def build_checkpoint(
    *,
    kind: str,
    model_config: dict,
    label_space: dict,
    preprocessing: dict,
    code_bits: int,
    fc7_dim: int,
    state_dict: dict[str, torch.Tensor],
    metrics: dict | None = None,
    training: dict | None = None,
) -> dict:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "model_config": model_config,
        "label_space": label_space,
        "preprocessing": preprocessing,
        "code_bits": int(code_bits),
        "fc7_dim": int(fc7_dim),
        "metrics": metrics or {},
        "state_dict": {key: value.detach().cpu().clone() for key, value in state_dict.items()},
    }
    if training is not None:
        checkpoint["training"] = training
    return checkpoint


def save_checkpoint(checkpoint: dict, path: str | Path) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)
    return path


def checkpoint_metadata(checkpoint: dict) -> dict:
    """Everything but the weights and the resumable training state: what describes the model."""
    return {key: value for key, value in checkpoint.items() if key not in ("state_dict", "training")}


def load_checkpoint(path: str | Path) -> dict:
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    version = checkpoint.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version!r}, this code reads {FORMAT_VERSION}")
    if checkpoint.get("kind") not in KINDS:
        raise ValueError(f"{path}: unknown checkpoint kind {checkpoint.get('kind')!r}")
    return checkpoint
