"""workers.ml is a library with four command modules on top, the way timm's library never imports its scripts.

No library module (anything in workers/ml but the command modules) imports a command module, not even inside a
function, and library modules import one another without a circle (imports at module level and inside
functions alike). Read from the source (every import statement in the file's syntax tree, relative ones and
`importlib.import_module("...")` included), so an import that only runs on some code path is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "workers.ml"
COMMANDS = frozenset(f"{PACKAGE}.{name}" for name in ("benchmark", "train", "evaluate", "onnx_export"))


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> source file, for every module and subpackage of `package` under `root`."""
    folder = root.joinpath(*package.split("."))
    modules = {}
    for path in sorted(folder.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _owner(name: str, known: set[str]) -> str | None:
    """The module a dotted name lives in: the longest known prefix (None outside the package)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def _import_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a `from X import ...` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, node.module] if node.module else parts)


def imports_of(module: str, path: Path, known: set[str]) -> dict[str, int]:
    """Every known module `module` imports anywhere in its file -> the first line that does."""
    found: dict[str, int] = {}

    def add(name: str | None, line: int) -> None:
        if name is not None and name != module:
            found.setdefault(name, line)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):  # import workers.ml.train [as t]
            for alias in node.names:
                add(_owner(alias.name, known), node.lineno)
        elif isinstance(node, ast.ImportFrom):  # from workers.ml import train / from .train import main
            base = _import_base(node, module, path.name == "__init__.py")
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in known else _owner(base, known), node.lineno)
        elif (
            isinstance(node, ast.Call)  # importlib.import_module("workers.ml.train"), __import__("...")
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(_owner(node.args[0].value, known), node.lineno)
    return found


def import_graph(root: Path, package: str) -> dict[str, dict[str, int]]:
    modules = package_modules(root, package)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def command_imports(graph: dict[str, dict[str, int]], commands: frozenset[str]) -> list[str]:
    """`library module:line imports command` for every library module that imports a command module."""
    return [
        f"{module}:{line} imports {imported}"
        for module, imports in sorted(graph.items())
        if module not in commands
        for imported, line in sorted(imports.items())
        if imported in commands
    ]


def import_cycle(graph: dict[str, dict[str, int]], commands: frozenset[str]) -> list[str] | None:
    """One circle of imports among library modules, as [a, b, ..., a], or None when there is none."""
    library = {module: [m for m in sorted(imports) if m not in commands] for module, imports in graph.items()}
    library = {module: imports for module, imports in library.items() if module not in commands}
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for imported in library.get(module, []):
            if state.get(imported) == "open":
                return [*path[path.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(library):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_library_module_imports_a_command_module():
    graph = import_graph(ROOT, PACKAGE)
    assert set(graph) >= COMMANDS, "a command module was renamed: update COMMANDS"
    assert not command_imports(graph, COMMANDS)


def test_library_modules_import_each_other_without_a_circle():
    cycle = import_cycle(import_graph(ROOT, PACKAGE), COMMANDS)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_checks_see_lazy_relative_and_dotted_imports(tmp_path):
    """The two checks above on a made-up package: each kind of import they must catch, caught."""
    files = {
        "pkg/__init__.py": "",
        "pkg/cli.py": "import pkg.lib\n",  # a command may import the library
        "pkg/lib.py": "def f():\n    from pkg import cli\n",  # lazy, `from package import module`
        "pkg/other.py": "from .cli import main\n",  # relative
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "import pkg.cli as c\nfrom ..sub import deeper\n",  # dotted; relative from a subpackage
        "pkg/sub/deeper.py": "import importlib\ndef g():\n    importlib.import_module('pkg.sub.deep')\n",
        "pkg/fine.py": "import os\nfrom pkg.lib import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.fine"] == {"pkg.lib": 2}  # os is not the package's; `from pkg.lib import f` is pkg.lib
    assert command_imports(graph, frozenset({"pkg.cli"})) == [
        "pkg.lib:2 imports pkg.cli",
        "pkg.other:1 imports pkg.cli",
        "pkg.sub.deep:1 imports pkg.cli",
    ]
    assert import_cycle(graph, frozenset({"pkg.cli"})) == ["pkg.sub.deep", "pkg.sub.deeper", "pkg.sub.deep"]
    # a circle through a command module is not the library's: commands sit on top
    assert import_cycle({"pkg.a": {"pkg.cli": 1}, "pkg.cli": {"pkg.a": 1}}, frozenset({"pkg.cli"})) is None


HELDOUT = frozenset(
    f"{PACKAGE}.{name}" for name in ("heldout_queries", "datasets.real_photos", "datasets.shop_benchmark")
)
TRAINING_ENTRY_POINTS = (f"{PACKAGE}.training", f"{PACKAGE}.train", f"{PACKAGE}.augment", f"{PACKAGE}.recipes")


def reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        for imported in graph.get(todo.pop(), {}):
            if imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return seen


def test_training_never_reaches_the_held_out_evaluation_data():
    """Evaluation queries and real photos are held out: no training code can import them, even indirectly."""
    graph = import_graph(ROOT, PACKAGE)
    assert set(graph) >= HELDOUT, "a held-out module was renamed: update HELDOUT"
    for entry in TRAINING_ENTRY_POINTS:
        assert not reachable(graph, entry) & HELDOUT, entry


def test_the_held_out_query_generator_shares_no_code_with_training_augmentation():
    graph = import_graph(ROOT, PACKAGE)
    assert f"{PACKAGE}.augment" not in reachable(graph, f"{PACKAGE}.heldout_queries")
