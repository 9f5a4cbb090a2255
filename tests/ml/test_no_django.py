"""workers.ml is pure torch/timm/numpy: it must import where Django is neither configured nor importable."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_workers_ml_imports_without_django():
    program = textwrap.dedent(
        """
        import importlib, os, pkgutil, sys
        os.environ.pop("DJANGO_SETTINGS_MODULE", None)
        class BlockDjango:  # make any attempt to import django (or celery, or the catalog app) fail loudly
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"django", "celery", "catalog", "rest_framework"}:
                    raise ImportError(f"workers.ml must not import {name}")
        sys.meta_path.insert(0, BlockDjango())
        import workers.ml
        modules = [m.name for m in pkgutil.walk_packages(workers.ml.__path__, "workers.ml.")]
        for name in modules:
            importlib.import_module(name)
        print(len(modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 1
