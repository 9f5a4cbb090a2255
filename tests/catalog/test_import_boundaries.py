"""Who may import whom. The catalog (models, services, the web) never imports `workers`: it enqueues worker tasks by
name (catalog.dispatch), and the workers import the catalog. That keeps web processes free of torch and the two
packages free of import circles. Read from the source (every import statement, function-level ones included, and
importlib calls), so an import on a code path no test runs is caught too."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(package: str) -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in a file: `import x`, `from x import y` (y too, in case it is a
    submodule), relative imports resolved, and importlib.import_module / __import__ with a literal name."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = ast.unparse(node.func)
            if called in ("importlib.import_module", "import_module", "__import__") and isinstance(
                node.args[0].value, str
            ):
                yield node.lineno, node.args[0].value


def _is_in(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


def test_no_catalog_module_imports_workers():
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for module, path in _sources("catalog").items()
        for line, imported in _imports(path, module)
        if _is_in(imported, "workers")
    ]
    assert not offending, "catalog must not import workers (enqueue by task name, catalog.dispatch):\n" + "\n".join(
        offending
    )


def test_the_inference_package_imports_neither_torch_nor_django_nor_the_apps():
    """inference is what both sides share (the web encodes the shopper's photo with it): torch-free and app-free."""
    forbidden = ("torch", "torchvision", "timm", "django", "celery", "catalog", "workers")
    offending = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for module, path in _sources("inference").items()
        for line, imported in _imports(path, module)
        if any(_is_in(imported, package) for package in forbidden)
    ]
    assert not offending, "\n".join(offending)


def test_catalog_and_worker_modules_import_each_other_without_a_circle():
    """Over every catalog and workers module (workers.ml's own boundary test covers the ML library)."""
    sources = {**_sources("catalog"), **_sources("workers")}
    nodes = {module for module in sources if not _is_in(module, "workers.ml")}
    graph = {
        module: {imported for _, imported in _imports(sources[module], module) if imported in nodes} - {module}
        for module in nodes
    }
    circles = [component for component in _strongly_connected(graph) if len(component) > 1]
    assert not circles, f"import circles: {circles}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit on long chains)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _loaded_after(imports: str) -> list[str]:
    """The torch and workers modules a fresh Django process has loaded after running `imports`."""
    code = (
        "import os, sys, django\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.settings')\n"
        "django.setup()\n"
        f"{imports}\n"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'workers'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_web_processes_load_neither_torch_nor_the_worker_side():
    """The URLconf, the API, the admin and the cascade load; of `workers` only its app config does (it is an
    installed app for its management commands). Query encoding happens in a worker."""
    loaded = _loaded_after(
        "import importlib\n"
        "for name in ('shop_search.urls', 'catalog.api.search', 'catalog.search', 'catalog.hamming', 'catalog.views',"
        " 'catalog.admin'):\n"
        "    importlib.import_module(name)\n"
        "from django.urls import resolve\n"
        "resolve('/api/search'); resolve('/')"
    )
    assert loaded == ["workers", "workers.apps"]


@pytest.mark.django_db(transaction=True)  # the web process below reads the version through its own connection
def test_a_web_process_encodes_and_searches_in_process_without_loading_torch(settings, tmp_path):
    """A fresh web process runs a photo search (SEARCH_ENCODER's default: ONNX Runtime in the process, keypoints
    for the verify stage included) on a real version 0 export; torch and the worker side never load."""
    from django.db import connection

    from catalog import query_encoder, search
    from catalog.services import model_versions
    from tests.catalog.fitted import fitted_version, photos, png

    version = model_versions.model_version_activate(version=fitted_version(tmp_path, name="v0-web"))
    photo = tmp_path / "shot.png"
    photo.write_bytes(png(photos(1, view=1)[0]))
    code = (
        "import json, os, sys, django\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'tests.settings')\n"
        "django.setup()\n"
        "from django.db import connections\n"
        f"connections['default'].settings_dict['NAME'] = {connection.settings_dict['NAME']!r}  # the test database\n"
        "from catalog import query_encoder, search\n"
        f"result = search.search_photo(data=open({str(photo)!r}, 'rb').read(), options=search.SearchOptions(k=3))\n"
        "print(json.dumps({'code': result.query.code.tobytes().hex(), 'timings': result.timings_ms,\n"
        "    'encoder': query_encoder.loaded_version() is not None,\n"
        "    'loaded': sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'workers'))}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    web = json.loads(done.stdout.strip().splitlines()[-1])

    assert web["loaded"] == ["workers", "workers.apps"]  # no torch, nothing of the worker side
    assert web["encoder"] and {"encode", "keypoints", "verify"} <= set(web["timings"])
    here = query_encoder.query_encode(  # as served: the photo mixed with its best item box
        image=query_encoder.query_image(photos(1, view=1)[0]), version=version,
        item_weight=search.item_fusion_weight(search.SearchOptions()),
    )  # fmt: skip
    assert web["code"] == here.encoding.code.tobytes().hex()


def test_a_worker_starts_without_torch_and_loads_it_for_the_network():
    """Importing the tasks and pipelines (what a worker does at start, whatever its queues) loads no torch: the
    network is loaded by the first task that needs it, or by the warm-up of a worker process."""
    loaded = _loaded_after("import workers.tasks, workers.pipelines")
    assert "torch" not in loaded and "workers.ml.encoder" not in loaded
