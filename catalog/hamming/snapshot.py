"""A memory index's rows on disk, so that a restarted web process reads a file instead of the whole version from
PostgreSQL, then catches up from the change log as any process that slept would.

A snapshot is the index's exact state at one change-log position: the rows, the highest change applied and the
changes still awaited with the transactions that may hold them (`MemoryCodeIndex._gaps`). It is only used when
that position is still in the log and is the same change there: the change row it ends at must exist with the
same id, time and subject, in the same database. Otherwise (another or recreated database, the log pruned past
it, a version of other sizes) the index is loaded from PostgreSQL as before, and a new snapshot written.

Writing one is split so that no search waits for the file (catalog.hamming.memory runs `store` on a thread of its
own): `begin` fixes the header (the position, the row count) under the index's lock, `store` then writes the
rows while searches go on, and writes the rows changed in place meanwhile as they were at `begin` (the index keeps
those, the first time each changes), so the file is exactly the index at the position its header names.

Format: 8 bytes (little-endian header length), a JSON header, then each column's rows as raw bytes in
`_Rows.COLUMNS` order. Written to a temporary name and renamed: a reader sees a whole file or none.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
from django.conf import settings
from django.db import connection

logger = logging.getLogger(__name__)

FORMAT = 1
_LENGTH = struct.Struct("<Q")
ABANDONED_S = 3600.0  # a temporary file untouched this long was left by a process that exited mid-write


class Columns(Protocol):
    """What a snapshot stores of the index's rows (catalog.hamming.memory._Rows, which this module does not import:
    memory imports it)."""

    COLUMNS: ClassVar[tuple[str, ...]]
    code_bytes: int
    fc7_dim: int
    size: int

    def reserve(self, capacity: int) -> None: ...


RowsT = TypeVar("RowsT", bound=Columns)


@dataclass(frozen=True)
class Snapshot(Generic[RowsT]):
    rows: RowsT
    high: int
    gaps: dict[frozenset[int], set[int]]


def directory() -> Path:
    return Path(settings.MODELS_DIR) / "index-snapshots"


def _database() -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database(), (SELECT oid FROM pg_database WHERE datname = current_database())")
        name, oid = cursor.fetchone()
    return {"database": name, "database_oid": int(oid)}


def _prefix(database: dict[str, Any]) -> str:
    return f"{database['database']}-{database['database_oid']}-v"


def _path(database: dict[str, Any], version_id: int) -> Path:
    return directory() / f"{_prefix(database)}{int(version_id)}.index"


def _change_at(change_id: int) -> list | None:
    """The change row a snapshot ends at, as its header records it (None: not in the log any more)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, created_at::text, op, embedding_id, product_id, model_version_id "
            "FROM catalog_indexchange WHERE id = %s",
            [change_id],
        )
        found = cursor.fetchone()
    return list(found) if found else None


@dataclass(frozen=True)
class Pending:
    """A snapshot begun: its header fixed at one change-log position (`begin`); `store` writes the rows."""

    path: Path
    prefix: str  # '<database>-<oid>-v': every snapshot of this database is named so
    header: bytes
    size: int
    version_id: int


def begin(
    *, version_id: int, code_bits: int, rows: Columns, high: int, gaps: dict[frozenset[int], set[int]]
) -> Pending | None:
    """The header of a snapshot of the index's state at change `high` (two primary-key reads: the caller holds the
    index's lock, so that the rows it hands to `store` are the ones at that position). None when there is nothing
    to anchor it to (a reader could not tell whether it is current) or the database cannot be read (logged)."""
    try:
        change = _change_at(high) if high else None
        if change is None:
            return None
        database = _database()
        header = json.dumps({
            "format": FORMAT, **database, "version_id": version_id, "code_bits": code_bits,
            "code_bytes": rows.code_bytes, "fc7_dim": rows.fc7_dim, "size": rows.size, "high": high,
            "change": change, "gaps": [[sorted(holders), sorted(ids)] for holders, ids in gaps.items()],
        }).encode()  # fmt: skip
        return Pending(path=_path(database, version_id), prefix=_prefix(database), header=header, size=rows.size,
                       version_id=version_id)  # fmt: skip
    except Exception:  # noqa: BLE001  (the file is only a shortcut: no snapshot this time)
        logger.exception("coarse index: could not begin the snapshot of version %s", version_id)
        return None


def store(
    pending: Pending, *, columns: Mapping[str, np.ndarray], changed: Callable[[], Mapping[int, Sequence[np.ndarray]]]
) -> bool:
    """Write the begun snapshot: each column's first `pending.size` rows, read from `columns` (in `COLUMNS` order)
    while the index may change them; then `changed()`, called once every column is read, gives the rows changed in
    place since `begin` with their values then (one array per column), which are written over what was read. So the
    file is the index at `begin`'s position, without copying the rows or holding the index's lock meanwhile.

    Written to a temporary name and renamed; other snapshots of this database are removed (only the newest
    version's is ever read), and so are temporary files left for an hour (a process that exited mid-write).
    Failures are logged, never raised (the file is only a shortcut); returns whether the file was written."""
    path = pending.path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(path.parent, prefix=pending.prefix)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(_LENGTH.pack(len(pending.header)) + pending.header)
                starts = []
                for column in columns.values():
                    starts.append(out.tell())
                    out.write(column[: pending.size].data.cast("B"))
                for row, values in changed().items():
                    for start, column, value in zip(starts, columns.values(), values, strict=True):
                        out.seek(start + row * column[:1].nbytes)
                        out.write(np.ascontiguousarray(value).data.cast("B"))
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        for other in path.parent.glob(f"{pending.prefix}*.index"):
            if other != path:
                other.unlink(missing_ok=True)
    except Exception:  # noqa: BLE001  (a full disk or a read-only folder costs the next start a SQL load, no more)
        logger.exception("coarse index: could not write the snapshot of version %s", pending.version_id)
        return False
    return True


def _remove_abandoned(folder: Path, *, prefix: str) -> None:
    """Temporary files of this database's snapshots untouched for ABANDONED_S: their writer is gone (a process
    that exited mid-write; a write takes seconds, and one that runs keeps touching its file)."""
    for temporary in folder.glob(f".{prefix}*"):
        try:
            if time.time() - temporary.stat().st_mtime > ABANDONED_S:
                temporary.unlink()
        except OSError:
            pass


def age_s(*, version_id: int) -> float | None:
    """Seconds since this database's snapshot of the version was written (None: there is none)."""
    try:
        return max(0.0, time.time() - _path(_database(), version_id).stat().st_mtime)
    except OSError:
        return None


def read(
    *, version_id: int, code_bits: int, fc7_dim: int, new_rows: Callable[[int, int], RowsT]
) -> Snapshot[RowsT] | None:
    """The stored state of the version if it is this database's, of these sizes, and its position is still in the
    change log as the same change; else None. The arrays are read straight into `new_rows(code_bytes, fc7_dim)`."""
    try:
        path = _path(_database(), version_id)
        with path.open("rb") as source:
            (length,) = _LENGTH.unpack(source.read(_LENGTH.size))
            header = json.loads(source.read(length))
            if (
                header.get("format") != FORMAT
                or header["version_id"] != version_id
                or header["code_bits"] != code_bits
                or header["fc7_dim"] != fc7_dim
                or _change_at(header["high"]) != header["change"]
            ):
                return None
            rows = new_rows(header["code_bytes"], fc7_dim)
            size = int(header["size"])
            rows.reserve(size)
            expected = _LENGTH.size + length + sum(getattr(rows, name)[:size].nbytes for name in rows.COLUMNS)
            if os.fstat(source.fileno()).st_size != expected:
                return None
            for name in rows.COLUMNS:
                view = memoryview(getattr(rows, name)[:size]).cast("B")
                if source.readinto(view) != len(view):
                    return None
            rows.size = size
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001  (an unreadable or foreign file: load from PostgreSQL instead)
        logger.exception("coarse index: ignoring the snapshot of version %s", version_id)
        return None
    gaps = {frozenset(holders): set(ids) for holders, ids in header["gaps"]}
    return Snapshot(rows=rows, high=int(header["high"]), gaps=gaps)
