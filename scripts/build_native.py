"""Builds the project's C extension in place: catalog/hamming/_scan (the coarse stage's Hamming scan).

The project runs from its checkout (it is not installed into the venv), so the extension is compiled next to its
source, the way `setup.py build_ext --inplace` would; scripts/venv.sh runs this after every venv check (about a
second when it has to compile, nothing when the build is up to date). Without a C compiler the search still works:
catalog/hamming/memory.py falls back to faiss's range search and logs that the scan is missing.

    python scripts/build_native.py [--force]    (--force: rebuild even if the library looks up to date)
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Distribution, Extension  # (in every Python 3.11 venv, and a dependency of torch)

ROOT = Path(__file__).resolve().parent.parent
EXTENSIONS = [
    Extension(
        "catalog.hamming._scan",
        sources=["catalog/hamming/_scan.c"],
        extra_compile_args=["-O3", "-std=c11"],
    ),
]


def main() -> int:
    # A Distribution made here reads no configuration file (pyproject.toml describes the project, not this build).
    distribution = Distribution({"name": "shop-search-native", "ext_modules": EXTENSIONS, "script_name": __file__})
    build = distribution.get_command_obj("build_ext")
    build.inplace = True
    build.force = "--force" in sys.argv[1:]
    build.build_temp = str(ROOT / "var" / "build")
    try:
        distribution.run_command("build_ext")
    except Exception as error:  # (distutils' CompileError and friends; the compiler printed its reasons above)
        print(f"build_native: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import os

    os.chdir(ROOT)
    sys.exit(main())
