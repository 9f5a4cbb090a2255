"""The memory backend: one process's copy of the active version's packed codes, searched with faiss's Hamming
kernel and kept in step with the database through the change log (catalog_indexchange) its triggers write."""

from __future__ import annotations

import io
import logging
import threading
import time
from dataclasses import dataclass, field

import faiss
import numpy as np
from django.db import connection

from catalog.codes import bitstring_pack, code_sql, version_sql
from catalog.hamming.candidates import CandidateDepth, CoarseCandidates, ProductFilter

logger = logging.getLogger(__name__)

CHANGE_POLL_INTERVAL_S = 0.0  # every search polls (one primary-key range scan, ~0.2 ms): a change is seen at once
CHANGE_BATCH = 10_000  # change rows read per round trip; a backlog beyond RELOAD_BACKLOG is cheaper as a reload
RELOAD_BACKLOG = 200_000  # more pending changes than this: reload the whole version instead of replaying
CHANGE_GAP_PATIENCE_S = 30.0  # a missing change id is an uncommitted transaction for this long, then a rollback
LOAD_LOOKBACK_IDS = 1_000  # changes just before a load may still be committing: replay this many ids behind it
COMPACT_DEAD_FRACTION = 0.25  # dead rows cost scan time; past this fraction the arrays are rewritten without them
MIN_CAPACITY = 1_024  # appends grow the arrays geometrically from here
APPENDED_RESORT_MIN = 10_000  # rows added since the last sort are looked up in a dict; past this many, re-sort
APPENDED_RESORT_FRACTION = 0.05  # (or this fraction of the index: an argsort of 1M ids costs ~80 ms)


@dataclass
class _Rows:
    """Growable column arrays of one version's visible embeddings."""

    code_bytes: int
    size: int = 0
    codes: np.ndarray = field(init=False)
    embedding_ids: np.ndarray = field(init=False)
    product_ids: np.ndarray = field(init=False)
    merchant_ids: np.ndarray = field(init=False)
    alive: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.codes = np.zeros((MIN_CAPACITY, self.code_bytes), np.uint8)
        self.embedding_ids = np.zeros(MIN_CAPACITY, np.int64)
        self.product_ids = np.zeros(MIN_CAPACITY, np.int64)
        self.merchant_ids = np.zeros(MIN_CAPACITY, np.int64)
        self.alive = np.zeros(MIN_CAPACITY, bool)

    def reserve(self, capacity: int) -> None:
        if capacity <= len(self.embedding_ids):
            return
        capacity = max(capacity, 2 * len(self.embedding_ids))
        for name in ("codes", "embedding_ids", "product_ids", "merchant_ids", "alive"):
            old = getattr(self, name)
            new = np.zeros((capacity, *old.shape[1:]), old.dtype)
            new[: self.size] = old[: self.size]
            setattr(self, name, new)

    @property
    def nbytes(self) -> int:
        return sum(
            getattr(self, name).nbytes for name in ("codes", "embedding_ids", "product_ids", "merchant_ids", "alive")
        )


@dataclass(frozen=True)
class IndexStats:
    version_id: int | None
    rows: int  # visible embeddings
    dead_rows: int  # slots of deleted/hidden embeddings not compacted yet
    memory_bytes: int
    full_loads: int  # how many times the whole version was read (tests prove changes do not cause these)
    applied_changes: int
    change_id: int  # the highest change applied


class MemoryCodeIndex:
    """One process's copy of the active version's codes, refreshed from the change log.

    Thread-safe: a lock guards refreshes and searches (a search over 1M codes takes ~2 ms).
    """

    name = "memory"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._version_id: int | None = None
        self._code_bits = 0
        self._rows: _Rows | None = None
        # Row lookup by embedding id without a 1M-entry dict: the loaded ids sorted once, plus the few rows appended
        # since (re-sorted when those grow).
        self._sorted_ids = np.zeros(0, np.int64)
        self._sorted_rows = np.zeros(0, np.int64)
        self._appended: dict[int, int] = {}
        self._dead = 0
        self._high = 0  # the highest change id applied (changes are read after it)
        self._gaps: dict[int, float] = {}  # change ids below it not seen yet -> when noticed (may still commit)
        self._last_poll = 0.0
        self._full_loads = 0
        self._applied_changes = 0

    # -- public ---------------------------------------------------------------------------------------------------
    def candidates(
        self, *, version_id: int, code_bits: int, code: np.ndarray, depth: CandidateDepth, product_filter: ProductFilter
    ) -> CoarseCandidates:
        with self._lock:
            self.refresh(version_id=version_id, code_bits=code_bits)
            rows = self._rows
            assert rows is not None
            n = rows.size
            distances = np.empty(n, np.int32)
            query = np.ascontiguousarray(np.asarray(code, np.uint8).reshape(1, -1))
            if query.shape[1] != rows.code_bytes:
                raise ValueError(f"query code has {query.shape[1]} bytes; version {version_id} has {rows.code_bytes}")
            if n:
                hammings = faiss.hammings  # type: ignore[attr-defined]  # (SWIG exports it; stubs do not)
                hammings(faiss.swig_ptr(query), faiss.swig_ptr(rows.codes), 1, n, rows.code_bytes,
                         faiss.swig_ptr(distances))  # fmt: skip
            visible = n - self._dead
            masked = (
                self._dead or product_filter.merchant_id is not None or product_filter.exclude_product_id is not None
            )
            if masked:  # (skipped in the common case: a full-catalog query with nothing deleted since the load)
                hidden = ~rows.alive[:n]
                if product_filter.merchant_id is not None:
                    hidden |= rows.merchant_ids[:n] != product_filter.merchant_id
                if product_filter.exclude_product_id is not None:
                    hidden |= rows.product_ids[:n] == product_filter.exclude_product_id
                distances[hidden] = code_bits + 1  # beyond any real distance: the histogram's overflow bin
                visible = n - int(np.count_nonzero(hidden))
            rows_taken, radius = _shells_from_histogram(distances, code_bits=code_bits, depth=depth)
            order = np.lexsort((rows.embedding_ids[rows_taken], distances[rows_taken]))
            rows_taken = rows_taken[order]
            # hidden rows sit at code_bits + 1: a radius past code_bits would count them as reachable
            if depth.radius is None or depth.radius >= code_bits:
                within_radius = visible
            else:
                within_radius = int((distances <= depth.radius).sum())
            return CoarseCandidates(
                embedding_ids=rows.embedding_ids[rows_taken].copy(),
                distances=distances[rows_taken],
                radius=radius,
                exhaustive=len(rows_taken) >= within_radius,
                backend=self.name,
                searched_rows=visible,
            )

    def refresh(self, *, version_id: int, code_bits: int, force: bool = False) -> None:
        """Make the index reflect the database: a full load for a new version, else replay new changes."""
        with self._lock:
            if self._version_id != version_id or self._code_bits != code_bits or self._rows is None:
                self._load(version_id=version_id, code_bits=code_bits)
                return
            now = time.monotonic()
            if not force and now - self._last_poll < CHANGE_POLL_INTERVAL_S:
                return
            self._last_poll = now
            self._replay_changes()

    def stats(self) -> IndexStats:
        with self._lock:
            rows = self._rows
            return IndexStats(
                version_id=self._version_id,
                rows=(rows.size - self._dead) if rows else 0,
                dead_rows=self._dead,
                memory_bytes=rows.nbytes if rows else 0,
                full_loads=self._full_loads,
                applied_changes=self._applied_changes,
                change_id=self._high,
            )

    def clear(self) -> None:
        with self._lock:
            self.__init__()  # type: ignore[misc]

    # -- loading ----------------------------------------------------------------------------------------------------
    def _load(self, *, version_id: int, code_bits: int) -> None:
        started = time.perf_counter()
        code_bytes = (code_bits + 7) // 8
        with connection.cursor() as cursor:
            cursor.execute("SELECT coalesce(max(id), 0) FROM catalog_indexchange")
            latest = int(cursor.fetchone()[0])
            low = max(0, latest - LOAD_LOOKBACK_IDS)
            cursor.execute("SELECT id FROM catalog_indexchange WHERE id > %s", [low])
            already = {int(row[0]) for row in cursor.fetchall()}
        table = _copy_version_rows(version_id=version_id, code_bits=code_bits)
        rows = _Rows(code_bytes=code_bytes)
        rows.reserve(len(table.embedding_ids))
        size = len(table.embedding_ids)
        rows.size = size
        rows.codes[:size] = table.codes
        rows.embedding_ids[:size] = table.embedding_ids
        rows.product_ids[:size] = table.product_ids
        rows.merchant_ids[:size] = table.merchant_ids
        rows.alive[:size] = True
        self._rows = rows
        self._version_id, self._code_bits = version_id, code_bits
        self._dead = 0
        self._index_rows()
        # Changes already visible are in the snapshot; ids missing just below the newest may still commit.
        self._high = latest
        now = time.monotonic()
        self._gaps = {missing: now for missing in range(low + 1, latest + 1) if missing not in already}
        self._last_poll = time.monotonic()
        self._full_loads += 1
        logger.info(
            "coarse index: loaded version %s (%d codes, %.1f MB) in %.2f s",
            version_id, size, rows.nbytes / 1e6, time.perf_counter() - started,
        )  # fmt: skip

    def _index_rows(self) -> None:
        rows = self._rows
        assert rows is not None
        self._sorted_rows = np.argsort(rows.embedding_ids[: rows.size], kind="stable")
        self._sorted_ids = rows.embedding_ids[: rows.size][self._sorted_rows]
        self._appended = {}

    def _row_of(self, embedding_id: int) -> int | None:
        row = self._appended.get(embedding_id)
        if row is not None:
            return row
        at = int(np.searchsorted(self._sorted_ids, embedding_id))
        if at < len(self._sorted_ids) and self._sorted_ids[at] == embedding_id:
            return int(self._sorted_rows[at])
        return None

    # -- the change log ---------------------------------------------------------------------------------------------
    def _replay_changes(self) -> None:
        """Apply changes after the highest one seen, and any late commits that filled a gap below it."""
        while True:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT id, embedding_id, product_id, model_version_id FROM catalog_indexchange "
                    "WHERE id > %s ORDER BY id LIMIT %s",
                    [self._high, CHANGE_BATCH],
                )
                changes = cursor.fetchall()
                late = []
                if self._gaps:
                    cursor.execute(
                        "SELECT id, embedding_id, product_id, model_version_id FROM catalog_indexchange "
                        "WHERE id = ANY(%s)",
                        [sorted(self._gaps)],
                    )
                    late = cursor.fetchall()
            if changes and int(changes[0][0]) > self._high + 1 and self._pruned_unseen():
                assert self._version_id is not None
                self._load(version_id=self._version_id, code_bits=self._code_bits)
                return
            if len(changes) >= CHANGE_BATCH and self._backlog() > RELOAD_BACKLOG:
                assert self._version_id is not None
                self._load(version_id=self._version_id, code_bits=self._code_bits)
                return
            self._note_gaps(ids=[int(row[0]) for row in changes], late=[int(row[0]) for row in late])
            todo = [*late, *changes]
            embedding_ids = {int(e) for _, e, _, v in todo if e is not None and v == self._version_id}
            product_ids = {int(p) for _, e, p, v in todo if e is None and p is not None}
            self._apply(embedding_ids=embedding_ids, product_ids=product_ids)
            self._applied_changes += len(todo)
            if len(changes) < CHANGE_BATCH:
                return

    def _pruned_unseen(self) -> bool:
        """Did the change-log prune (catalog.services.maintenance) delete changes this index never read (it slept
        past the retention)? Then replaying is impossible and only a reload is correct. Asked only when the next
        change is not the one right after the last seen, so the common poll pays nothing for it."""
        with connection.cursor() as cursor:
            cursor.execute("SELECT min(id) FROM catalog_indexchange")
            oldest = cursor.fetchone()[0]
        return oldest is not None and int(oldest) > self._high + 1

    def _backlog(self) -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM catalog_indexchange WHERE id > %s", [self._high])
            return int(cursor.fetchone()[0])

    def _note_gaps(self, *, ids: list[int], late: list[int]) -> None:
        """Ids are handed out at insert but become visible at commit, so a missing id may still arrive: remember
        it for a while (then it was rolled back), and only the recent ones (older ones would be a rare leak)."""
        now = time.monotonic()
        for change_id in late:
            self._gaps.pop(change_id, None)
        for change_id in ids:
            if change_id > self._high + 1:
                for missing in range(max(self._high + 1, change_id - LOAD_LOOKBACK_IDS), change_id):
                    self._gaps.setdefault(missing, now)
            self._high = max(self._high, change_id)
        self._gaps = {
            gap: noticed
            for gap, noticed in self._gaps.items()
            if now - noticed < CHANGE_GAP_PATIENCE_S and gap > self._high - LOAD_LOOKBACK_IDS
        }

    def _apply(self, *, embedding_ids: set[int], product_ids: set[int]) -> None:
        """Re-read the current rows of everything the changes name: upsert what is visible, hide the rest."""
        if not embedding_ids and not product_ids:
            return
        rows = self._rows
        assert rows is not None and self._version_id is not None
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT e.id, e.product_id, p.merchant_id, p.active, ({code_sql('e.code', self._code_bits)})::text "
                "FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id "
                "WHERE e.model_version_id = %s AND (e.id = ANY(%s) OR e.product_id = ANY(%s))",
                [self._version_id, sorted(embedding_ids), sorted(product_ids)],
            )
            current = cursor.fetchall()
        seen: set[int] = set()
        for embedding_id, product_id, merchant_id, active, bits in current:
            seen.add(embedding_id)
            if active:
                self._upsert(embedding_id, product_id, merchant_id, bitstring_pack(bits))
            else:
                self._hide(embedding_id)
        gone = set(embedding_ids) - seen
        if product_ids:  # one vectorised pass finds the rows of every product named (rare: visibility changes)
            of_products = np.isin(rows.product_ids[: rows.size], np.fromiter(product_ids, np.int64))
            gone |= set(rows.embedding_ids[: rows.size][of_products].tolist()) - seen
        for embedding_id in gone:
            self._hide(embedding_id)
        if rows.size >= MIN_CAPACITY and self._dead > COMPACT_DEAD_FRACTION * rows.size:
            self._compact()
        elif len(self._appended) > max(APPENDED_RESORT_MIN, APPENDED_RESORT_FRACTION * rows.size):
            self._index_rows()

    def _upsert(self, embedding_id: int, product_id: int, merchant_id: int, code: np.ndarray) -> None:
        rows = self._rows
        assert rows is not None
        row = self._row_of(embedding_id)
        if row is None:
            rows.reserve(rows.size + 1)
            row = rows.size
            rows.size += 1
            self._appended[embedding_id] = row
        elif not rows.alive[row]:
            self._dead -= 1
        rows.codes[row] = code
        rows.embedding_ids[row] = embedding_id
        rows.product_ids[row] = product_id
        rows.merchant_ids[row] = merchant_id
        rows.alive[row] = True

    def _hide(self, embedding_id: int) -> None:
        rows = self._rows
        assert rows is not None
        row = self._row_of(embedding_id)
        if row is not None and rows.alive[row]:
            rows.alive[row] = False
            self._dead += 1

    def _compact(self) -> None:
        rows = self._rows
        assert rows is not None
        keep = np.flatnonzero(rows.alive[: rows.size])
        compacted = _Rows(code_bytes=rows.code_bytes)
        compacted.reserve(len(keep))
        compacted.size = len(keep)
        for name in ("codes", "embedding_ids", "product_ids", "merchant_ids", "alive"):
            getattr(compacted, name)[: len(keep)] = getattr(rows, name)[keep]
        self._rows = compacted
        self._dead = 0
        self._index_rows()


@dataclass(frozen=True)
class _VersionTable:
    embedding_ids: np.ndarray
    product_ids: np.ndarray
    merchant_ids: np.ndarray
    codes: np.ndarray


def _copy_version_rows(*, version_id: int, code_bits: int) -> _VersionTable:
    """All visible embeddings of a version in one binary COPY, parsed by numpy (1M rows in about a second)."""
    code_bytes = (code_bits + 7) // 8
    sql = (
        f"COPY (SELECT e.id, e.product_id, p.merchant_id, {code_sql('e.code', code_bits)} "
        "FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id "
        f"WHERE {version_sql('e', version_id)} AND p.active) TO STDOUT (FORMAT BINARY)"
    )
    buffer = io.BytesIO()
    connection.ensure_connection()
    with connection.connection.cursor() as cursor, cursor.copy(sql) as copy:
        for chunk in copy:
            buffer.write(chunk)
    data = buffer.getvalue()
    # Binary COPY: 19-byte header, then per row int16 field count and (int32 length, bytes) per field, then -1.
    row_type = np.dtype(
        [
            ("fields", ">i2"),
            ("id_len", ">i4"), ("id", ">i8"),
            ("product_len", ">i4"), ("product", ">i8"),
            ("merchant_len", ">i4"), ("merchant", ">i8"),
            ("code_len", ">i4"), ("code_bits", ">i4"), ("code", np.uint8, (code_bytes,)),
        ]
    )  # fmt: skip
    body = data[19:-2]
    table = np.frombuffer(body, dtype=row_type, count=len(body) // row_type.itemsize)
    return _VersionTable(
        embedding_ids=table["id"].astype(np.int64),
        product_ids=table["product"].astype(np.int64),
        merchant_ids=table["merchant"].astype(np.int64),
        codes=np.ascontiguousarray(table["code"]),
    )


def _shells_from_histogram(distances: np.ndarray, *, code_bits: int, depth: CandidateDepth) -> tuple[np.ndarray, int]:
    """Rows (unordered) of the whole shells `depth` asks for, and the radius taken. O(N): one histogram, one scan."""
    limit = code_bits if depth.radius is None else min(code_bits, depth.radius)
    counts = np.bincount(distances, minlength=code_bits + 2)[: limit + 1]  # hidden rows sit at code_bits + 1
    cumulative = np.cumsum(counts)
    if cumulative.size == 0 or cumulative[-1] == 0:
        return np.zeros(0, np.int64), -1
    reach = int(np.searchsorted(cumulative, depth.min_count))  # first radius with >= min_count, if any
    radius = min(reach, limit)
    while radius >= 0 and cumulative[radius] > depth.max_count:
        radius -= 1
    if radius < 0 or cumulative[radius] == 0:
        # The first non-empty shell alone overshoots max_count: truncate it (some candidates beat none).
        first = int(np.flatnonzero(counts)[0])
        rows = np.flatnonzero(distances == first)[: depth.max_count]
        return rows.astype(np.int64), first
    radius = int(np.flatnonzero(counts[: radius + 1])[-1])  # the farthest shell actually taken
    return np.flatnonzero(distances <= radius).astype(np.int64), radius
