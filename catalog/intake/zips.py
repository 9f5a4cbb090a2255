"""Zip archives of catalog images. A zip is hostile until every entry has been read: names may climb out of any
directory, entries may be symlinks, and headers may lie about sizes.

Two checks, of different cost. Opening a `SafeZip` reads only the central directory: entry count, names, types,
and the sizes the headers declare (each entry, their sum, each entry's and the archive's compression ratio); that
is cheap enough for the upload request. `zip_check` inflates every entry and counts the real bytes against the same
caps, so lying headers do not help; it runs in the import's first task, never in a web request.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from catalog.intake import READ_BLOCK, IntakeError
from catalog.intake.images import MAX_IMAGE_BYTES

MAX_ZIP_ENTRIES = 50_000  # a 10k-product catalog with a few images each, plus directories
MAX_ZIP_TOTAL_BYTES = 2 * 1024 * 1024 * 1024  # inflated, all entries (the import uses IMPORT_ZIP_MAX_INFLATED_BYTES)
MAX_ZIP_ENTRY_BYTES = MAX_IMAGE_BYTES  # an entry is an image: no image may be larger
MAX_ZIP_RATIO = 50  # JPEG/PNG/WebP hardly compress; a 50:1 entry is a bomb, not a photo
# Below this an entry's ratio is not judged: a flat-colour thumbnail compresses well and costs nothing. Small enough
# that many small entries cannot add up to a bomb (2,000 entries of 250 kB in a 0.7 MB zip are each 700:1); the
# archive's ratio as a whole is judged too, past ZIP_ARCHIVE_RATIO_MIN_BYTES.
ZIP_RATIO_MIN_BYTES = 16 * 1024
ZIP_ARCHIVE_RATIO_MIN_BYTES = 1024 * 1024
_SYMLINK_MODE = 0o120000
_FILE_TYPE_MASK = 0o170000


class _ZipEntryTooLarge(IntakeError):
    pass


@dataclass(frozen=True)
class ZipEntry:
    name: str  # normalised: forward slashes, no leading "./"
    info: zipfile.ZipInfo


def _zip_name_normalise(raw: str) -> str:
    """The entry's path inside the archive, or IntakeError if it could point anywhere else (zip slip)."""
    if "\x00" in raw:
        raise IntakeError(f"zip entry {raw!r} has a NUL byte in its name")
    name = raw.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise IntakeError(f"zip entry {raw!r} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if any(part == ".." for part in parts):
        raise IntakeError(f"zip entry {raw!r} climbs out of the archive (path traversal)")
    return "/".join(parts)


class SafeZip:
    """A zip archive whose entry names were checked on open; entries are read with counted, capped sizes.

    Opening checks what the headers declare; `zip_check` reads every entry once (the import fails as a whole if
    anything is wrong); chunks of an import then `read` only the entries they need, with the same caps.
    """

    def __init__(
        self,
        source: str | Path | BinaryIO,
        *,
        max_entries: int = MAX_ZIP_ENTRIES,
        max_entry_bytes: int = MAX_ZIP_ENTRY_BYTES,
        max_total_bytes: int = MAX_ZIP_TOTAL_BYTES,
    ) -> None:
        try:
            self._zip = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise IntakeError("the images file is not a zip archive (or is corrupt)") from exc
        self.max_entry_bytes = max_entry_bytes
        self.max_total_bytes = max_total_bytes
        infos = self._zip.infolist()
        if len(infos) > max_entries:
            raise IntakeError(f"the zip has {len(infos):,} entries; the limit is {max_entries:,}")
        self.entries: dict[str, ZipEntry] = {}
        by_basename: dict[str, list[str]] = {}
        for info in infos:
            name = _zip_name_normalise(info.filename)
            mode = (info.external_attr >> 16) & _FILE_TYPE_MASK
            if mode == _SYMLINK_MODE:
                raise IntakeError(f"zip entry {info.filename!r} is a symbolic link; only plain files are accepted")
            if info.flag_bits & 0x1:
                raise IntakeError(f"zip entry {info.filename!r} is encrypted")
            if info.is_dir() or not name:
                continue
            if name in self.entries:
                raise IntakeError(f"zip entry {name!r} appears twice")
            if info.file_size > max_entry_bytes:
                raise IntakeError(f"zip entry {name!r} is {info.file_size:,} bytes; the limit is {max_entry_bytes:,}")
            _ratio_check(name, info.file_size, info.compress_size)
            self.entries[name] = ZipEntry(name, info)
            by_basename.setdefault(name.rsplit("/", 1)[-1], []).append(name)
        declared = sum(entry.info.file_size for entry in self.entries.values())
        _archive_check(declared, sum(entry.info.compress_size for entry in self.entries.values()), max_total_bytes)
        # Manifests often name images without the folder they were zipped in: a unique base name is enough.
        self._basenames = {base: names[0] for base, names in by_basename.items() if len(names) == 1}

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> SafeZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve(self, reference: str) -> str | None:
        """The archive entry a manifest's image reference names (exact path, else a unique base name)."""
        try:
            name = _zip_name_normalise(reference)
        except IntakeError:
            return None
        if name in self.entries:
            return name
        return self._basenames.get(name)

    def blocks(self, name: str, *, limit: int | None = None) -> Iterator[bytes]:
        """The entry's bytes, decompressed in blocks and counted; IntakeError past `limit`, the entry cap or the
        ratio cap."""
        entry = self.entries[name]
        cap = self.max_entry_bytes if limit is None else min(limit, self.max_entry_bytes)
        count = 0
        try:
            with self._zip.open(entry.info) as handle:
                while block := handle.read(READ_BLOCK):
                    count += len(block)
                    if count > cap:
                        raise _ZipEntryTooLarge(f"zip entry {name!r} is larger than {cap:,} bytes")
                    _ratio_check(name, count, entry.info.compress_size)
                    yield block
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as exc:
            raise IntakeError(f"zip entry {name!r} is corrupt: {exc}") from exc

    def read(self, name: str, *, limit: int | None = None) -> bytes:
        """The entry's bytes (see `blocks`)."""
        return b"".join(self.blocks(name, limit=limit))


def _ratio_check(name: str, inflated: int, compressed: int) -> None:
    if inflated > ZIP_RATIO_MIN_BYTES and inflated / max(compressed, 1) > MAX_ZIP_RATIO:
        raise IntakeError(f"zip entry {name!r} expands more than {MAX_ZIP_RATIO}:1 (a zip bomb, not an image)")


def _archive_check(inflated: int, compressed: int, max_total_bytes: int) -> None:
    if inflated > max_total_bytes:
        raise IntakeError(f"the zip expands to more than {max_total_bytes:,} bytes")
    if inflated > ZIP_ARCHIVE_RATIO_MIN_BYTES and inflated / max(compressed, 1) > MAX_ZIP_RATIO:
        raise IntakeError(
            f"the zip expands more than {MAX_ZIP_RATIO}:1 as a whole ({inflated:,} bytes from {compressed:,}; "
            "a zip bomb, not images)"
        )


def zip_check(source: str | Path | BinaryIO, *, max_total_bytes: int = MAX_ZIP_TOTAL_BYTES) -> list[str]:
    """Open a zip and inflate every entry once, counting real bytes against the entry, ratio and total caps
    (nothing is kept: memory stays one block); returns its file names or raises IntakeError."""
    total = compressed = 0
    with SafeZip(source, max_total_bytes=max_total_bytes) as archive:
        for name, entry in archive.entries.items():
            remaining = max_total_bytes - total
            compressed += entry.info.compress_size
            try:
                for block in archive.blocks(name, limit=remaining):
                    total += len(block)
            except _ZipEntryTooLarge:
                if remaining >= archive.max_entry_bytes:
                    raise
                raise IntakeError(f"the zip expands to more than {max_total_bytes:,} bytes") from None
            _archive_check(total, compressed, max_total_bytes)
        return list(archive.entries)
