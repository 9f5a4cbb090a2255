"""Zip archives of catalog images. A zip is hostile until every entry has been read: names may climb out of any
directory, entries may be symlinks, and headers may lie about sizes. Sizes are therefore counted while
decompressing, never taken from the headers."""

from __future__ import annotations

import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from catalog.intake import READ_BLOCK, IntakeError
from catalog.intake.images import MAX_IMAGE_BYTES

MAX_ZIP_ENTRIES = 50_000  # a 10k-product catalog with a few images each, plus directories
MAX_ZIP_TOTAL_BYTES = 4 * 1024 * 1024 * 1024  # uncompressed: ~20k full-size product photos
MAX_ZIP_ENTRY_BYTES = MAX_IMAGE_BYTES  # an entry is an image: no image may be larger
MAX_ZIP_RATIO = 50  # JPEG/PNG/WebP hardly compress; a 50:1 entry is a bomb, not a photo
ZIP_RATIO_MIN_BYTES = 256 * 1024  # below this a high ratio is harmless (a flat-colour PNG) and not judged
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

    `zip_check` reads every entry once (the upload is rejected as a whole if anything is wrong); chunks of an
    import then `read` only the entries they need, with the same caps.
    """

    def __init__(
        self,
        source: str | Path | BinaryIO,
        *,
        max_entries: int = MAX_ZIP_ENTRIES,
        max_entry_bytes: int = MAX_ZIP_ENTRY_BYTES,
    ) -> None:
        try:
            self._zip = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise IntakeError("the images file is not a zip archive (or is corrupt)") from exc
        self.max_entry_bytes = max_entry_bytes
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
            self.entries[name] = ZipEntry(name, info)
            by_basename.setdefault(name.rsplit("/", 1)[-1], []).append(name)
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

    def read(self, name: str, *, limit: int | None = None) -> bytes:
        """The entry's bytes, decompressed in blocks and counted; IntakeError past `limit` or the ratio cap."""
        entry = self.entries[name]
        cap = self.max_entry_bytes if limit is None else min(limit, self.max_entry_bytes)
        compressed = max(entry.info.compress_size, 1)
        buffer = bytearray()
        try:
            with self._zip.open(entry.info) as handle:
                while block := handle.read(READ_BLOCK):
                    buffer += block
                    if len(buffer) > cap:
                        raise _ZipEntryTooLarge(f"zip entry {name!r} is larger than {cap:,} bytes")
                    if len(buffer) > ZIP_RATIO_MIN_BYTES and len(buffer) / compressed > MAX_ZIP_RATIO:
                        raise IntakeError(
                            f"zip entry {name!r} expands more than {MAX_ZIP_RATIO}:1 (a zip bomb, not an image)"
                        )
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as exc:
            raise IntakeError(f"zip entry {name!r} is corrupt: {exc}") from exc
        return bytes(buffer)


def zip_check(source: str | Path | BinaryIO, *, max_total_bytes: int = MAX_ZIP_TOTAL_BYTES) -> list[str]:
    """Open and fully read a zip, counting real bytes; returns its file names or raises IntakeError."""
    total = 0
    with SafeZip(source) as archive:
        for name in archive.entries:
            remaining = max_total_bytes - total
            try:
                total += len(archive.read(name, limit=remaining))
            except _ZipEntryTooLarge:
                if remaining >= archive.max_entry_bytes:
                    raise
                raise IntakeError(f"the zip expands to more than {max_total_bytes:,} bytes") from None
        return list(archive.entries)
