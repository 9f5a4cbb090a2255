"""The worker's encoder cache runs trained networks on ONNX Runtime, exported once beside the checkpoint."""

import os

import numpy as np
import pytest
from celery.exceptions import SoftTimeLimitExceeded

from tests.ml.ml_helpers import assert_same_bits, random_image, save_tiny_checkpoint
from workers import encoders
from workers.ml.baseline import fit_baseline
from workers.ml.encoder import Encoder
from workers.ml.export import is_current_export


def _images(count=4):
    rng = np.random.default_rng(3)
    return [random_image(rng, (30 + i, 40)) for i in range(count)]


def test_a_trained_network_is_exported_once_and_run_on_onnx_runtime(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt", spread_codes=True)
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

    # the checkpoint changed (a resumed run rewrote model.pt), even with an older modification time than the
    # export's (copied in with `cp -p`): the export no longer matches it and is made again
    save_tiny_checkpoint(checkpoint, seed=1, spread_codes=True)
    os.utime(checkpoint, ns=(exported_at - 10**9, exported_at - 10**9))
    assert not is_current_export(onnx_path, checkpoint)
    renewed = encoders._load(checkpoint, "onnx")
    assert is_current_export(onnx_path, checkpoint) and onnx_path.stat().st_mtime_ns > exported_at
    assert np.allclose(renewed.encode(_images()).fc7, Encoder.load(checkpoint).encode(_images()).fc7, atol=1e-5)

    onnx_path.write_bytes(b"half a file")  # unreadable: not current, exported again
    assert not is_current_export(onnx_path, checkpoint)
    assert encoders._load(checkpoint, "onnx").version_info["path"] == str(onnx_path)
    assert is_current_export(onnx_path, checkpoint)


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

    monkeypatch.setattr("workers.ml.export.export", broken_export)
    checkpoint = save_tiny_checkpoint(tmp_path / "model.pt")
    encoder = encoders._load(checkpoint, "onnx")
    assert encoder.version_info["path"] == str(checkpoint)  # torch, from the checkpoint itself
    assert len(encoder.encode(_images(2))) == 2
    assert "ONNX export of" in caplog.text and "exporter gap" in caplog.text


def test_a_task_out_of_time_is_not_mistaken_for_an_export_failure(tmp_path, monkeypatch):
    def slow_export(*args, **kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr("workers.ml.export.export", slow_export)
    with pytest.raises(SoftTimeLimitExceeded):
        encoders._load(save_tiny_checkpoint(tmp_path / "model.pt"), "onnx")


def test_worker_processes_have_time_to_preload_and_export_the_network():
    from shop_search.celery import app

    # Celery kills a new pool process that is not up within this; preloading + a first export takes ~10 s
    assert app.conf.worker_proc_alive_timeout >= 30
