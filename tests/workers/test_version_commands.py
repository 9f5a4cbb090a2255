"""The operators' commands mirror the dashboard: train, evaluate_version (tests/workers/test_golden_evaluation.py),
compare_versions, switch_version (refused when worse, unless --override) and register_checkpoint."""

import io

import pytest
from django.core.management import CommandError, call_command

from catalog.models import ModelVersion, TrainingRun
from catalog.services import golden
from tests.ml.ml_helpers import save_tiny_checkpoint

pytestmark = pytest.mark.django_db


def _version(name: str, status: str, r1: float | None) -> ModelVersion:
    version = ModelVersion.objects.create(name=name, checkpoint=f"{name}.pt", code_bits=8, status=status)
    if r1 is not None:
        numbers = {
            "queries": 200, "r1": r1, "r10": 0.6, "map10": 0.4, "coarse_recall": 0.9, "final_recall": 0.6,
            "encode_ms_p50": 9.0, "encode_ms_p95": 12.0, "by_source": {"heldout": {"queries": 200, "r1": r1}},
        }  # fmt: skip
        version = golden.version_golden_record(version_id=version.pk, numbers=numbers)
    return version


def _run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=out)
    return out.getvalue()


def test_switch_version_refuses_a_worse_version_without_override_and_switches_with_it():
    _version("v0", "active", r1=0.28)
    worse = _version("run7", "ready", r1=0.02)
    with pytest.raises(CommandError, match=r"not switched: run7 scores worse .* \(R@1 2\.0% against 28\.0%\)"):
        _run("switch_version", "run7")
    assert ModelVersion.objects.get(pk=worse.pk).status == "ready"
    assert "run7 is indexing" in _run("switch_version", "run7", "--override")
    assert ModelVersion.objects.get(pk=worse.pk).status == "indexing"


def test_compare_versions_prints_both_side_by_side_and_the_verdict():
    _version("v0", "active", r1=0.28)
    _version("run8", "ready", r1=0.41)
    printed = _run("compare_versions", "run8")
    assert "run8" in printed and "v0" in printed and "41.0%" in printed and "28.0%" in printed
    assert "source heldout" in printed and "needs no override" in printed


def test_train_starts_a_run_with_the_dashboards_choices():
    assert "queued" in _run("train")
    assert TrainingRun.objects.get().config == {}  # the dashboard's defaults: nothing overridden
    _run("train", "--epochs", "3", "--code-bits", "128", "--config", '{"lr": 0.001}')
    latest = TrainingRun.objects.order_by("-id").first()
    assert latest.config == {"epochs": 3, "model": {"code_bits": 128}, "lr": 0.001}
    assert latest.state == TrainingRun.State.PENDING


def test_register_checkpoint_registers_a_checkpoint_that_loads_as_a_ready_version(settings, tmp_path):
    settings.MODELS_DIR = tmp_path / "models"
    checkpoint = save_tiny_checkpoint(tmp_path / "elsewhere" / "benchmark.pt")
    printed = _run("register_checkpoint", str(checkpoint), "--name", "bench-1")
    version = ModelVersion.objects.get(name="bench-1")
    assert "registered bench-1" in printed
    assert version.status == "ready" and version.kind == "fashionnet"
    assert (version.code_bits, version.fc7_dim) == (32, 32)
    assert version.checkpoint.startswith(str(settings.MODELS_DIR))  # copied where every worker reads models
    assert version.config["registered_from"] == str(checkpoint.resolve())


def test_register_checkpoint_refuses_a_file_that_does_not_load(settings, tmp_path):
    settings.MODELS_DIR = tmp_path / "models"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CommandError, match="does not load"):
        _run("register_checkpoint", str(junk))
    assert not ModelVersion.objects.exists() and not list((tmp_path / "models").rglob("*.pt"))
