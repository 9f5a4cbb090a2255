"""The worker's encoder cache runs trained networks on ONNX Runtime, exported once beside the checkpoint."""

import os

import numpy as np

from tests.ml.ml_helpers import assert_same_bits, random_image, save_tiny_checkpoint
from workers import encoders
from workers.ml.baseline import fit_baseline
from workers.ml.encoder import Encoder


def _images(count=4):
    rng = np.random.default_rng(3)
    return [random_image(rng, (30 + i, 40)) for i in range(count)]


def test_a_trained_network_is_exported_once_and_run_on_onnx_runtime(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    encoder = encoders._load(checkpoint, "onnx")
    onnx_path = tmp_path / "model.onnx"
    assert encoder.version_info["path"] == str(onnx_path) and onnx_path.exists()
    assert not list(tmp_path.glob("*.tmp"))
    expected = Encoder.load(checkpoint).encode(_images())
    actual = encoder.encode(_images())
    assert_same_bits(checkpoint, _images(), actual, expected)
    assert np.allclose(actual.fc7, expected.fc7, atol=1e-5)

    exported_at = onnx_path.stat().st_mtime_ns
    encoders._load(checkpoint, "onnx")
    assert onnx_path.stat().st_mtime_ns == exported_at  # up to date: not exported again

    # the checkpoint changed (a resumed run rewrote model.pt): the stale export is replaced
    save_tiny_checkpoint(checkpoint, seed=1)
    os.utime(onnx_path, ns=(exported_at, checkpoint.stat().st_mtime_ns - 1_000_000_000))
    renewed = encoders._load(checkpoint, "onnx")
    assert onnx_path.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns
    assert np.allclose(renewed.encode(_images()).fc7, Encoder.load(checkpoint).encode(_images()).fc7, atol=1e-5)


def test_torch_runtime_never_exports_and_version_zero_runs_on_onnx_too(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    assert encoders._load(checkpoint, "torch").version_info["path"] == str(checkpoint)
    assert not list(tmp_path.glob("*.onnx"))
    baseline = fit_baseline(_images(6), out_path=tmp_path / "v0.pt", code_bits=32, input_size=32)
    encoder = encoders._load(baseline, "onnx")
    assert encoder.version_info["kind"] == "baseline" and encoder.version_info["path"] == str(tmp_path / "v0.onnx")
    expected = Encoder.load(baseline).encode(_images())
    assert_same_bits(baseline, _images(), encoder.encode(_images()), expected)


def test_a_failed_export_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    def broken_export(*args, **kwargs):
        raise RuntimeError("exporter gap")

    monkeypatch.setattr("workers.ml.onnx_export.export", broken_export)
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    encoder = encoders._load(checkpoint, "onnx")
    assert encoder.version_info["path"] == str(checkpoint)  # torch, from the checkpoint itself
    assert len(encoder.encode(_images(2))) == 2
    assert "ONNX export of" in caplog.text and "exporter gap" in caplog.text
