"""Files from a Debian package, without root: `apt-get download` + `dpkg-deb -x`, cached under the data dir.

Real data the project may use ships in Debian packages (Fashion-MNIST's photos, OpenCV's sample photographs).
`package_files()` returns a directory holding the wanted files, in this order of preference:
1. `<data dir>/<name>/` — the data dir is `$SHOP_SEARCH_DATA_DIR`, default `var/data/` in the repository;
2. the package's own folder when it is installed system-wide;
3. otherwise it downloads the .deb into a temporary folder next to (1), unpacks it and copies the wanted files
   into (1) with one rename, so a concurrent or interrupted fetch never leaves half a folder behind.
If that fails, `PackageUnavailable` says what to run by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

DATA_DIR_ENV = "SHOP_SEARCH_DATA_DIR"
REPO_ROOT = Path(__file__).resolve().parents[3]
COMMAND_TIMEOUT_S = 600  # a cold apt-get update plus a 100 MB download on a slow mirror


class PackageUnavailable(RuntimeError):
    """The files are not on this machine and could not be fetched from Debian."""


def data_dir() -> Path:
    """Where downloaded data sets live: $SHOP_SEARCH_DATA_DIR, default var/data under the repository."""
    return Path(os.environ.get(DATA_DIR_ENV) or REPO_ROOT / "var" / "data")


def package_files(
    *,
    package: str,
    subdir: Path,
    name: str,
    complete: Callable[[Path], bool],
    wanted: Callable[[Path], bool] = lambda _: True,
    root: Path | None = None,
) -> Path:
    """A directory whose files satisfy `complete`, copied from `subdir` of Debian's `package` if needed.

    `wanted` picks which files of `subdir` are copied (by path); `root` overrides the data dir (tests)."""
    target = (root or data_dir()) / name
    if complete(target):
        return target
    system_dir = Path("/") / subdir
    if root is None and complete(system_dir):
        return system_dir
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as work:
        work_dir = Path(work)
        _apt_download(package, work_dir)
        debs = sorted(work_dir.glob(f"{package}_*.deb"))
        if not debs:
            raise PackageUnavailable(f"apt-get download left no {package} .deb in {work_dir}")
        _run(["dpkg-deb", "-x", str(debs[-1]), str(work_dir / "unpacked")], package=package, subdir=subdir)
        unpacked = work_dir / "unpacked" / subdir
        staging = work_dir / name
        staging.mkdir()
        for file in sorted(unpacked.iterdir()) if unpacked.is_dir() else []:
            if file.is_file() and wanted(file):
                shutil.copy2(file, staging / file.name)
        if not complete(staging):
            raise PackageUnavailable(f"{debs[-1].name} lacks the expected files under {subdir}")
        try:
            staging.rename(target)
        except OSError:
            if not complete(target):  # not a concurrent download that finished first
                raise
    return target


def _apt_download(package: str, work_dir: Path) -> None:
    try:
        _run(["apt-get", "download", package], package=package, cwd=work_dir)
    except PackageUnavailable:
        # A fresh machine may not have package lists yet; refreshing them needs root.
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise
        _run(["apt-get", "update"], package=package, cwd=work_dir)
        _run(["apt-get", "download", package], package=package, cwd=work_dir)


def _run(command: list[str], *, package: str, subdir: Path | None = None, cwd: Path | None = None) -> None:
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as error:
        details = getattr(error, "stderr", None) or str(error)
        where = f"pkg/{subdir}" if subdir else "the unpacked package"
        raise PackageUnavailable(
            f"could not fetch {package}: `{' '.join(command)}` failed: {details.strip()}\n"
            f"Fetch it by hand: `apt-get download {package} && dpkg-deb -x {package}_*.deb pkg` and copy the files "
            f"of {where} into {data_dir()} (or set {DATA_DIR_ENV}), or `apt-get install {package}`."
        ) from error
