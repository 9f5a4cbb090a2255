"""The memory backend: one process's copy of the active version's packed codes, searched with faiss's Hamming
kernels and the project's own range scan (`_scan.c`), and kept in step with the database through the change log
(catalog_indexchange) its triggers write."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import faiss
import numpy as np
from django.conf import settings
from django.db import connection

import catalog.hamming.snapshot as snapshot
from catalog.codes import bitstring_pack, code_sql, version_sql
from catalog.hamming.candidates import CandidateDepth, CoarseCandidates, ProductFilter, shell_cut
from catalog.hamming.cards import DEFAULT_CAPACITY, CardCache

try:  # the range scan in C, built in place by scripts/build_native.py (scripts/venv.sh runs it)
    import catalog.hamming._scan as native_scan
except ImportError:  # not built (no C compiler where the venv was made): faiss's range search does the same, slower
    native_scan = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)
if native_scan is None:
    logger.warning(
        "catalog/hamming/_scan.c is not built (python scripts/build_native.py): large catalogs' coarse stage uses "
        "faiss's range search instead, ~1.4x slower"
    )

CHANGE_POLL_INTERVAL_S = 0.0  # every search polls (one primary-key range scan, ~0.2 ms): a change is seen at once
CHANGE_BATCH = 10_000  # change rows read per round trip; a backlog beyond RELOAD_BACKLOG is cheaper as a reload
RELOAD_BACKLOG = 200_000  # more pending changes than this: reload the whole version instead of replaying
COMPACT_DEAD_FRACTION = 0.25  # dead rows cost scan time; past this fraction the arrays are rewritten without them
MIN_CAPACITY = 1_024  # appends grow the arrays geometrically from here
APPENDED_RESORT_MIN = 10_000  # rows added since the last sort are looked up in a dict; past this many, re-sort
APPENDED_RESORT_FRACTION = 0.05  # (or this fraction of the index: an argsort of 1M ids costs ~80 ms)
# The search: a counting k-NN pass asks for KNN_FIRST_FACTOR x min_count rows first (whole shells usually reach
# min_count well within that), then KNN_GROWTH times more; past KNN_MAX_K rows the k-NN's per-distance id lists cost
# more than one full distance pass, which takes over (bench_search at 1M: k-NN for 801 rows ~1.3x the time to read
# the codes once, the full pass with its histogram ~2.5x).
KNN_FIRST_FACTOR = 2
KNN_GROWTH = 8
KNN_MAX_K = 8_192
# On a large index the k-NN's per-distance id lists for thousands of rows cost about as much again as the scan. There,
# the radius whose whole shells hold RANGE_MARGIN x min_count rows is first estimated from a fixed random sample of
# the codes (RANGE_SAMPLE rows, ~0.04 ms), then one range scan collects every row within it: `_scan.c` (AVX2, about
# the time it takes numpy to read the codes once at 1M x 256 bits) or, where it is not built, faiss's range search
# (~1.4x that). An estimate that falls short costs that pass and the k-NN answers; either way the answer is the same
# whole shells.
RANGE_MIN_ROWS = 200_000
RANGE_SAMPLE = 16_384
RANGE_MARGIN = 1.5
CARD_CHANGE = "card"  # IndexChange.Op.CARD: what a result card shows changed (migration 0013); no code moved
# A process that has kept its index fresh rewrites the version's snapshot (catalog/hamming/snapshot.py) when the one
# on disk is older than this, so a restart finds one whose position the change-log prune (a day) has not removed.
# The file is written by a thread of its own (`_SnapshotWrite`): the search that asks for it does not wait (~9 s at
# 1M products with fc7), nor do the searches behind it.
SNAPSHOT_REFRESH_S = 3 * 3600
SNAPSHOT_CHECK_S = 60.0  # how often a process looks at the snapshot's age (one stat)
COPY_PARSE_BYTES = 32 << 20  # a load parses the COPY stream this much at a time (bounded extra memory)
POSTFILTER_MAX_DEAD = 1_000  # up to this many dead rows are dropped after the k-NN; more are skipped by a bitmap


@dataclass
class _Rows:
    """Growable column arrays of one version's visible embeddings."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("codes", "embedding_ids", "product_ids", "merchant_ids", "alive", "fc7")

    code_bytes: int
    fc7_dim: int = 0  # 0: fc7 not held (settings.SEARCH_FC7_IN_MEMORY off); the fine stage then reads PostgreSQL
    size: int = 0
    codes: np.ndarray = field(init=False)
    embedding_ids: np.ndarray = field(init=False)
    product_ids: np.ndarray = field(init=False)
    merchant_ids: np.ndarray = field(init=False)
    alive: np.ndarray = field(init=False)
    fc7: np.ndarray = field(init=False)  # float32, as stored: the fine stage's exact distances need no rounding

    def __post_init__(self) -> None:
        self.codes = np.zeros((MIN_CAPACITY, self.code_bytes), np.uint8)
        self.embedding_ids = np.zeros(MIN_CAPACITY, np.int64)
        self.product_ids = np.zeros(MIN_CAPACITY, np.int64)
        self.merchant_ids = np.zeros(MIN_CAPACITY, np.int64)
        self.alive = np.zeros(MIN_CAPACITY, bool)
        self.fc7 = np.zeros((MIN_CAPACITY, self.fc7_dim), np.float32)

    def reserve(self, capacity: int) -> None:
        if capacity <= len(self.embedding_ids):
            return
        capacity = max(capacity, 2 * len(self.embedding_ids))
        for name in self.COLUMNS:
            old = getattr(self, name)
            new = np.zeros((capacity, *old.shape[1:]), old.dtype)
            new[: self.size] = old[: self.size]
            setattr(self, name, new)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, name).nbytes for name in self.COLUMNS)


class _SnapshotWrite:
    """One snapshot being written on a thread of its own while searches go on and the change log is replayed into
    the same arrays: the columns as they were when it began (the arrays themselves, not a copy: ~570 MB at 1M
    products with fc7), and the values then of the rows changed in place since (`keep`, at their first change).

    Appended rows land past `size` (or in new arrays when they grow), and a compaction or reload makes new arrays:
    neither touches what the thread reads. Only `_upsert` of a row already there and `_hide` change rows in place,
    and they call `keep` before the change; the thread calls `changed` once it has read every column, and a row
    changed after that is not read any more. The two meet on a lock of their own, not the index's, so that the
    thread never waits behind a search."""

    def __init__(self, rows: _Rows) -> None:
        self.rows = rows
        self.size = rows.size
        self.columns = {name: getattr(rows, name) for name in _Rows.COLUMNS}
        self._kept = threading.Lock()
        self._before: dict[int, tuple[np.ndarray, ...]] | None = {}

    def keep(self, rows: _Rows, row: int) -> None:
        """Row `row` of `rows` is about to change in place (under the index's lock: the rows change nowhere else)."""
        with self._kept:
            before = self._before
            if before is not None and rows is self.rows and row < self.size and row not in before:
                before[row] = tuple(column[row].copy() for column in self.columns.values())

    def changed(self) -> dict[int, tuple[np.ndarray, ...]]:
        """The rows changed since the write began, as they were then; no more are kept after this call."""
        with self._kept:
            before, self._before = self._before or {}, None
        return before


# At most one snapshot write at a time in a process (a second would only write the same file again); its thread.
_SNAPSHOT_WRITER = threading.Lock()
_snapshot_thread: threading.Thread | None = None


@dataclass(frozen=True)
class Fc7Ranking:
    """Products nearest first, each with its best embedding and that embedding's exact fc7 L2 distance."""

    product_ids: np.ndarray  # (P,) int64
    embedding_ids: np.ndarray  # (P,) int64
    distances: np.ndarray  # (P,) float32
    positions: np.ndarray  # (P,) where each of those embeddings was in the embedding ids asked about


@dataclass(frozen=True)
class IndexStats:
    version_id: int | None
    rows: int  # visible embeddings
    dead_rows: int  # slots of deleted/hidden embeddings not compacted yet
    memory_bytes: int
    full_loads: int  # how many times the whole version was read (tests prove changes do not cause these)
    applied_changes: int
    change_id: int  # the highest change applied
    pending_changes: int  # change ids below it that a running transaction may still commit
    snapshot_loads: int = 0  # full loads read from a snapshot file instead of PostgreSQL (counted in full_loads too)


class MemoryCodeIndex:
    """One process's copy of the active version's codes, refreshed from the change log.

    Thread-safe: a lock guards refreshes and searches (a search over 1M codes takes ~2 ms). The snapshot is written
    beside them, without it (`_SnapshotWrite`).
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
        self._sample: np.ndarray = np.zeros((0, 1), np.uint8)  # for the range search's radius estimate
        self._sample_of: object = None  # the rows it was drawn from
        self._high = 0  # the highest change id applied (changes are read after it)
        # Change ids below _high not seen yet, grouped by the transactions that may hold them (see _replay_changes).
        self._gaps: dict[frozenset[int], set[int]] = {}
        self._last_poll = 0.0
        self._full_loads = 0
        self._snapshot_loads = 0
        self._snapshot_checked = 0.0
        self._snapshot_due = False  # a load from PostgreSQL asks for a snapshot, whatever the age of the one on disk
        self._snapshot_writing: _SnapshotWrite | None = None
        self._applied_changes = 0
        # The result cards of the fine stage's winners (cards.py), kept exact by the same change log; cleared when
        # the index reloads (the changes a reload skips are unknown).
        self.cards = CardCache(int(getattr(settings, "SEARCH_CARD_CACHE", DEFAULT_CAPACITY)))
        self._cards_loads = 0

    # -- public ---------------------------------------------------------------------------------------------------
    def candidates(
        self,
        *,
        version_id: int,
        code_bits: int,
        code: np.ndarray,
        depth: CandidateDepth,
        product_filter: ProductFilter,
        poll: bool = True,
    ) -> CoarseCandidates:
        """The coarse stage. `poll=False`: the caller has just brought the index up to date (`refresh`, which
        catalog.search runs while the photo is encoded); it is loaded again only if it holds another version."""
        with self._lock:
            if poll or self._rows is None or (self._version_id, self._code_bits) != (version_id, code_bits):
                self.refresh(version_id=version_id, code_bits=code_bits)
            return self.search_loaded(code=code, depth=depth, product_filter=product_filter)

    def search_loaded(
        self, *, code: np.ndarray, depth: CandidateDepth, product_filter: ProductFilter
    ) -> CoarseCandidates:
        """The selection proper, over what is loaded (no database round trip): what bench_search puts next to the
        time it takes to read the codes once.

        Usually one counting k-NN pass (faiss `hammings_knn_mc`: per-distance counters, a single read of the codes,
        no full distance array, no sort) for a little more than min_count rows; its sorted answer is cut into whole
        shells by `shell_cut`. When the shells there do not reach min_count, k grows; past KNN_MAX_K (a widened,
        filter-starved query) one full distance pass with a histogram (`_scan_all`) is cheaper. Either way the
        answer is the same whole shells."""
        with self._lock:
            rows = self._rows
            assert rows is not None
            query = np.ascontiguousarray(np.asarray(code, np.uint8).reshape(1, -1))
            if query.shape[1] != rows.code_bytes:
                raise ValueError(
                    f"query code has {query.shape[1]} bytes; version {self._version_id} has {rows.code_bytes}"
                )
            n = rows.size
            selector, bitmap, pad = None, None, 0
            if product_filter.merchant_id is not None or self._dead > POSTFILTER_MAX_DEAD:
                # Rows the k-NN may not return are skipped inside the pass (a bitmap selector; ~0.8 ms more at 1M).
                allowed = rows.alive[:n].copy()
                if product_filter.merchant_id is not None:
                    allowed &= rows.merchant_ids[:n] == product_filter.merchant_id
                bitmap = np.packbits(allowed, bitorder="little")
                selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
                visible = int(np.count_nonzero(allowed))
            else:
                pad = self._dead  # a few dead rows are dropped after the pass, which asks for that many more
                visible = n - self._dead
            excluded = product_filter.exclude_product_id
            if excluded is not None:
                of_excluded = (rows.product_ids[:n] == excluded) & rows.alive[:n]
                if product_filter.merchant_id is not None:
                    of_excluded &= rows.merchant_ids[:n] == product_filter.merchant_id
                visible -= int(np.count_nonzero(of_excluded))
            depth = depth.for_rows(visible)

            def visible_only(labels: np.ndarray, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                """Drop the dead rows a pass without a selector returns, and the excluded product's."""
                if not pad and excluded is None:
                    return labels, distances
                keep = np.ones(len(labels), bool)
                if pad:
                    keep &= rows.alive[labels]
                if excluded is not None:
                    keep &= rows.product_ids[labels] != excluded
                return labels[keep], distances[keep]

            if selector is None and depth.radius is None and n >= RANGE_MIN_ROWS:
                found = self._range(query, rows=rows, min_count=depth.min_count, visible=visible)
                if found is not None:
                    labels, distances = visible_only(*found)
                    if len(labels) >= depth.min_count:  # else the estimate fell short: the k-NN below answers
                        order = np.argsort(distances.astype(np.uint16), kind="stable")  # (radix: ~5x an int32 sort)
                        labels, distances = labels[order], distances[order]
                        taken = shell_cut(sorted_distances=distances, depth=depth, complete=True)
                        return self._candidates(
                            rows, labels[:taken], distances[:taken], exhaustive=taken >= visible, visible=visible
                        )
            # max_count + 1 rows always decide the cut (the shell holding the last of them overshoots), so the first
            # pass never asks for more: at 1M products min_count = max_count = 4,000, where asking 2 x min_count
            # cost ~1.25x the time (bench_search).
            k = min(n, max(min(KNN_FIRST_FACTOR * depth.min_count, depth.max_count), 1) + 1 + pad)
            while n and k <= KNN_MAX_K:
                labels, distances, complete = self._knn(query, k=k, selector=selector)
                labels, distances = visible_only(labels, distances)
                within = len(distances)
                if depth.radius is not None:
                    within = int(np.searchsorted(distances, depth.radius, side="right"))
                    complete = complete or within < len(distances)  # the list already runs past the radius
                if complete or within > depth.max_count or _complete_shell_rows(distances[:within]) >= depth.min_count:
                    taken = shell_cut(sorted_distances=distances, depth=depth, complete=complete)
                    exhaustive = complete and taken >= within
                    return self._candidates(
                        rows, labels[:taken], distances[:taken], exhaustive=exhaustive, visible=visible
                    )
                k = min(n, max(KNN_GROWTH * k, depth.max_count + 1 + pad))  # the shells reached are too thin: ask more
            return self._scan_all(query=query, depth=depth, product_filter=product_filter)

    def _candidates(
        self, rows: Any, labels: np.ndarray, distances: np.ndarray, *, exhaustive: bool, visible: int
    ) -> CoarseCandidates:
        """The rows taken (distance-sorted), ordered by distance then embedding id, as the fine stage gets them."""
        order = _by_distance_then_id(distances, rows.embedding_ids[labels])
        chosen = labels[order]
        return CoarseCandidates(
            embedding_ids=rows.embedding_ids[chosen].copy(),
            distances=distances[order],
            radius=int(distances[-1]) if len(distances) else -1,
            exhaustive=exhaustive,
            backend=self.name,
            searched_rows=visible,
            rows=chosen,
        )

    def _range(
        self, query: np.ndarray, *, rows: Any, min_count: int, visible: int
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Every row (dead ones included) within the radius whose shells the sample says hold RANGE_MARGIN x
        min_count visible rows, and their distances, unsorted; None when the sample puts that beyond every code."""
        sample = self._range_sample(rows)
        sampled = np.empty(len(sample), np.int32)
        _one_thread()
        hammings: Any = getattr(faiss, "hammings")  # noqa: B009 (not in the stubs)
        hammings(faiss.swig_ptr(query), faiss.swig_ptr(sample), 1, len(sample), rows.code_bytes,
                 faiss.swig_ptr(sampled))  # fmt: skip
        estimated = np.cumsum(np.bincount(sampled, minlength=rows.code_bytes * 8 + 1)) * (visible / len(sample))
        radius = int(np.searchsorted(estimated, RANGE_MARGIN * min_count))  # the first distance estimated to hold them
        if radius >= rows.code_bytes * 8:
            return None
        if native_scan is not None:
            return _within_radius(query, rows=rows, radius=radius, expected=int(estimated[radius]))
        result = faiss.RangeSearchResult(1)
        # faiss keeps the rows strictly nearer than its radius: radius + 1 takes the whole shell at `radius`.
        range_search: Any = getattr(faiss, "hamming_range_search")  # noqa: B009 (not in the stubs)
        range_search(faiss.swig_ptr(query), faiss.swig_ptr(rows.codes), 1, rows.size, radius + 1, rows.code_bytes,
                     result)  # fmt: skip
        found = int(faiss.rev_swig_ptr(result.lims, 2)[1])
        labels = faiss.rev_swig_ptr(result.labels, found).astype(np.int64)
        distances = faiss.rev_swig_ptr(result.distances, found).astype(np.int32)
        return labels, distances

    def _range_sample(self, rows: Any) -> np.ndarray:
        """RANGE_SAMPLE random codes of these rows, kept until the rows are replaced (appends and deaths only shift
        the estimate, which the answer does not depend on)."""
        if self._sample_of is not rows:
            picked = np.random.default_rng(0).choice(rows.size, min(RANGE_SAMPLE, rows.size), replace=False)
            self._sample = np.ascontiguousarray(rows.codes[np.sort(picked)])
            self._sample_of = rows
        return self._sample

    def _knn(self, query: np.ndarray, *, k: int, selector: object) -> tuple[np.ndarray, np.ndarray, bool]:
        """The k nearest rows (nearest first; a tie at the k-th distance is cut in scan order), their distances,
        and whether that is every row the selector allows."""
        rows = self._rows
        assert rows is not None
        labels = np.empty(k, np.int64)
        distances = np.empty(k, np.int32)
        knn: Any = faiss.hammings_knn_mc  # (the stubs leave out its IDSelector argument)
        _one_thread()
        knn(faiss.swig_ptr(query), faiss.swig_ptr(rows.codes), 1, rows.size, k, rows.code_bytes,
            faiss.swig_ptr(distances), faiss.swig_ptr(labels), selector)  # fmt: skip
        got = int(np.count_nonzero(labels >= 0))  # missing answers (fewer rows than k) come last, as -1
        return labels[:got], distances[:got], got < k or k >= rows.size

    def _scan_all(self, *, query: np.ndarray, depth: CandidateDepth, product_filter: ProductFilter) -> CoarseCandidates:
        """Every distance (faiss's Hamming kernel), hidden rows pushed past the last shell, whole shells picked from
        a histogram: for depths too large for the k-NN pass."""
        rows = self._rows
        assert rows is not None
        code_bits = self._code_bits
        n = rows.size
        distances = np.empty(n, np.int32)
        if n:
            hammings = faiss.hammings  # type: ignore[attr-defined]  # (SWIG exports it; stubs do not)
            _one_thread()
            hammings(faiss.swig_ptr(query), faiss.swig_ptr(rows.codes), 1, n, rows.code_bytes,
                     faiss.swig_ptr(distances))  # fmt: skip
        visible = n - self._dead
        masked = self._dead or product_filter.merchant_id is not None or product_filter.exclude_product_id is not None
        if masked:  # (skipped in the common case: a full-catalog query with nothing deleted since the load)
            hidden = ~rows.alive[:n]
            if product_filter.merchant_id is not None:
                hidden |= rows.merchant_ids[:n] != product_filter.merchant_id
            if product_filter.exclude_product_id is not None:
                hidden |= rows.product_ids[:n] == product_filter.exclude_product_id
            distances[hidden] = code_bits + 1  # beyond any real distance: the histogram's overflow bin
            visible = n - int(np.count_nonzero(hidden))
        depth = depth.for_rows(visible)  # (search_loaded's depth is already resolved: this changes nothing then)
        rows_taken, radius = _shells_from_histogram(distances, code_bits=code_bits, depth=depth)
        order = _by_distance_then_id(distances[rows_taken], rows.embedding_ids[rows_taken])
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
            rows=rows_taken,
        )

    def fc7_rank(
        self, *, version_id: int, embedding_ids: np.ndarray, fc7: np.ndarray, rows_hint: np.ndarray | None = None
    ) -> Fc7Ranking | None:
        """The fine stage's exact part, in memory: fc7 L2 distance of each of these embeddings (float32 as stored,
        read from the rows beside their codes), then each product's best one, nearest first (ties: product id).
        None when this index does not hold the version's fc7 (then PostgreSQL ranks them). An embedding no longer
        here (deleted, hidden since the coarse stage) is left out.

        `rows_hint`: where the coarse stage found them (CoarseCandidates.rows); used when those rows still hold
        these embeddings (nothing was compacted or reloaded since), which saves looking up each id (~0.3 ms for
        1,000 candidates among 1M: a binary search each, in 8 MB of sorted ids)."""
        with self._lock:
            rows = self._rows
            if rows is None or self._version_id != version_id or not rows.fc7_dim:
                return None
            ids = np.asarray(embedding_ids, np.int64)
            at = None
            if rows_hint is not None and len(rows_hint) == len(ids) and (not len(ids) or rows_hint.max() < rows.size):
                at = np.asarray(rows_hint, np.int64)
                if not np.array_equal(rows.embedding_ids.take(at), ids):
                    at = None
            if at is None:
                at = self._rows_of(ids)
            present = at >= 0
            present[present] = rows.alive[at[present]]
            positions = np.flatnonzero(present)
            ids, at = ids[positions], at[positions]
            vectors = rows.fc7.take(at, axis=0)
            products = rows.product_ids.take(at)
        difference = vectors - np.asarray(fc7, np.float32).reshape(1, -1)
        distances = np.sqrt(np.einsum("ij,ij->i", difference, difference))
        # Nearest first, ties by embedding id: then each product's first row is its best image.
        order = np.argsort(distances, kind="stable")
        if len(order) > 1 and (np.diff(distances[order]) == 0).any():  # (equal distances are rare: then by id)
            order = np.lexsort((ids, distances))
        products, ids, distances, positions = products[order], ids[order], distances[order], positions[order]
        _, first = np.unique(products, return_index=True)
        if len(first) < len(products):  # (one image per product, the usual case, has nothing to drop)
            first.sort()
            products, ids, distances, positions = products[first], ids[first], distances[first], positions[first]
        if len(distances) > 1 and (distances[1:] == distances[:-1]).any():  # equal distances: by product id
            order = np.lexsort((products, distances))
            products, ids, distances, positions = products[order], ids[order], distances[order], positions[order]
        return Fc7Ranking(product_ids=products, embedding_ids=ids, distances=distances, positions=positions)

    def result_cards(self, embedding_ids: Iterable[int]) -> tuple[dict[int, Any], int]:
        """The result cards this process holds for these embeddings (cards.py), and the token to hand back to
        `cards.put` with the ones read from PostgreSQL. A reload since the last call clears them first."""
        with self._lock:
            if self._cards_loads != self._full_loads:
                self.cards.clear()
                self._cards_loads = self._full_loads
        return self.cards.get(embedding_ids)

    def fc7_of(self, *, version_id: int, embedding_ids: np.ndarray) -> np.ndarray | None:
        """The stored fc7 of these embeddings, in the given order (query expansion reads its neighbours here); None
        when this index does not hold the version's fc7 or lacks one of them (then PostgreSQL is read)."""
        with self._lock:
            rows = self._rows
            if rows is None or self._version_id != version_id or not rows.fc7_dim:
                return None
            at = self._rows_of(np.asarray(embedding_ids, np.int64))
            if (at < 0).any():
                return None
            return rows.fc7[at].copy()

    def _rows_of(self, embedding_ids: np.ndarray) -> np.ndarray:
        """Row of each embedding id, -1 where there is none (vectorised _row_of)."""
        at = np.searchsorted(self._sorted_ids, embedding_ids)
        inside = at < len(self._sorted_ids)
        found = np.full(len(embedding_ids), -1, np.int64)
        hit = inside.copy()
        hit[inside] = self._sorted_ids[at[inside]] == embedding_ids[inside]
        found[hit] = self._sorted_rows[at[hit]]
        if self._appended:
            for index in np.flatnonzero(~hit):
                found[index] = self._appended.get(int(embedding_ids[index]), -1)
        return found

    def refresh(self, *, version_id: int, code_bits: int, force: bool = False) -> None:
        """Make the index reflect the database: a full load for a new version, else replay new changes. A snapshot
        this asks for is written by another thread: it returns without waiting for the file (`wait_snapshot`)."""
        with self._lock:
            now = time.monotonic()
            if self._version_id != version_id or self._code_bits != code_bits or self._rows is None:
                self._load(version_id=version_id, code_bits=code_bits)
            elif not force and now - self._last_poll < CHANGE_POLL_INTERVAL_S:
                return
            else:
                self._last_poll = now
                self._replay_changes()
            self._snapshot_refresh(now)

    @staticmethod
    def wait_snapshot(timeout: float | None = None) -> bool:
        """Wait for the process's snapshot write, if one runs (a command that exits after a load, a test); False if
        it still runs after `timeout` seconds."""
        thread = _snapshot_thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

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
                pending_changes=sum(len(ids) for ids in self._gaps.values()),
                snapshot_loads=self._snapshot_loads,
            )

    def clear(self) -> None:
        with self._lock:
            self.__init__()  # type: ignore[misc]  # (a snapshot write running goes on with the arrays it holds)

    # -- loading ----------------------------------------------------------------------------------------------------
    def _load(self, *, version_id: int, code_bits: int, from_snapshot: bool = True) -> None:
        """The whole version: from this database's snapshot file when it is still current (then the change log is
        replayed from its position), else from PostgreSQL (then a snapshot is due for the next start: `refresh`
        starts writing it once the load is done)."""
        started = time.perf_counter()
        fc7_dim = _fc7_dim(version_id) if getattr(settings, "SEARCH_FC7_IN_MEMORY", True) else 0
        snapshots = getattr(settings, "SEARCH_INDEX_SNAPSHOTS", True)
        if snapshots and from_snapshot and self._load_snapshot(version_id=version_id, code_bits=code_bits,
                                                                fc7_dim=fc7_dim):  # fmt: skip
            logger.info(
                "coarse index: loaded version %s from its snapshot (%d codes, %.1f MB) and caught up in %.2f s",
                version_id, self._rows.size if self._rows else 0, self._rows.nbytes / 1e6 if self._rows else 0,
                time.perf_counter() - started,
            )  # fmt: skip
            return
        # One statement, so one snapshot: the newest change, the ids missing below it, and which transactions were
        # running (only those can still commit a missing id; the others' holes are rollbacks).
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT (SELECT coalesce(max(id), 0) FROM catalog_indexchange), {_SNAPSHOT_SQL}, "
                " ARRAY(SELECT id FROM (SELECT id, lead(id) OVER (ORDER BY id) AS next FROM catalog_indexchange) t"
                "  WHERE next > id + 1 ORDER BY id),"
                " ARRAY(SELECT next FROM (SELECT id, lead(id) OVER (ORDER BY id) AS next FROM catalog_indexchange) t"
                "  WHERE next > id + 1 ORDER BY id)"
            )
            latest, position, hole_starts, hole_ends = cursor.fetchone()
        running = _running_transactions(position)
        rows = _copy_version_rows(version_id=version_id, code_bits=code_bits, fc7_dim=fc7_dim)
        size = rows.size
        self._rows = rows
        self._version_id, self._code_bits = version_id, code_bits
        self._dead = 0
        self._index_rows()
        # Changes visible then are in the rows copied; a missing id below the newest may still commit if a
        # transaction was running (ids below the oldest change kept are the prune's, not gaps).
        self._high = int(latest)
        holes = {gap for start, end in zip(hole_starts, hole_ends) for gap in range(start + 1, end)}
        self._gaps = {running: holes} if running and holes else {}
        self._last_poll = time.monotonic()
        self._full_loads += 1
        logger.info(
            "coarse index: loaded version %s (%d codes, %.1f MB) in %.2f s",
            version_id, size, rows.nbytes / 1e6, time.perf_counter() - started,
        )  # fmt: skip
        self._snapshot_due = snapshots

    def _load_snapshot(self, *, version_id: int, code_bits: int, fc7_dim: int) -> bool:
        """Take the snapshot's rows and change-log position, then replay what changed since, exactly as a process
        that had slept since then would (a backlog too long or pruned makes that replay load from PostgreSQL)."""
        stored = snapshot.read(
            version_id=version_id,
            code_bits=code_bits,
            fc7_dim=fc7_dim,
            new_rows=lambda code_bytes, dim: _Rows(code_bytes=code_bytes, fc7_dim=dim),
        )
        if stored is None:
            return False
        rows = stored.rows
        self._rows = rows
        self._version_id, self._code_bits = version_id, code_bits
        self._dead = int(rows.size - np.count_nonzero(rows.alive[: rows.size]))
        self._index_rows()
        self._high, self._gaps = stored.high, stored.gaps
        self._full_loads += 1
        self._snapshot_loads += 1
        self._last_poll = self._snapshot_checked = time.monotonic()
        self._replay_changes()
        return True

    def _snapshot_refresh(self, now: float) -> None:
        """Start writing the snapshot when a load from PostgreSQL asked for one, or the one on disk has grown old
        (by any process of this database). While a write runs, nothing is asked: the next poll after it ends is."""
        if not getattr(settings, "SEARCH_INDEX_SNAPSHOTS", True) or _SNAPSHOT_WRITER.locked():
            return
        if not self._snapshot_due and now - self._snapshot_checked < SNAPSHOT_CHECK_S:
            return
        self._snapshot_checked = now
        assert self._version_id is not None
        if not self._snapshot_due:
            age = snapshot.age_s(version_id=self._version_id)
            if age is not None and age <= SNAPSHOT_REFRESH_S:
                return
        self._snapshot_due = False
        self._snapshot_start()

    def _snapshot_start(self) -> None:
        """Fix the snapshot's header here, under the lock (the position, the row count: two primary-key reads),
        then hand the file to a thread: the arrays are read there while searches go on (`_SnapshotWrite`)."""
        global _snapshot_thread
        assert self._version_id is not None and self._rows is not None
        if not _SNAPSHOT_WRITER.acquire(blocking=False):
            return
        try:
            pending = snapshot.begin(version_id=self._version_id, code_bits=self._code_bits, rows=self._rows,
                                     high=self._high, gaps=self._gaps)  # fmt: skip
            if pending is None:
                _SNAPSHOT_WRITER.release()
                return
            writing = _SnapshotWrite(self._rows)
            thread = threading.Thread(
                target=_snapshot_store, args=(pending, writing), name="coarse-index-snapshot", daemon=True
            )
            thread.start()  # (its rows are read from here on; their changes are kept once this call returns)
            self._snapshot_writing, _snapshot_thread = writing, thread
        except BaseException:
            self._snapshot_writing = None
            _SNAPSHOT_WRITER.release()
            raise

    def _snapshot_keep(self, rows: _Rows, row: int) -> None:
        """Row `row` changes in place: a snapshot being written keeps its value first."""
        if self._snapshot_writing is not None:
            self._snapshot_writing.keep(rows, row)

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
        """Apply changes after the highest one seen, and those that filled a gap below it since.

        Ids are handed out at insert but become visible at commit, so a missing id may still arrive, however long
        its transaction runs. The catch-up is exact: each read also returns its own snapshot (which transactions
        were still running); a missing id can only belong to one of those (its transaction had its xid before
        taking the id, since the triggers write after the row), so it is remembered with them, asked for again once
        one of them has ended, and forgotten only when all have ended without it (a rollback)."""
        while True:
            changes, running = _changes_read("id > %s ORDER BY id LIMIT %s", [self._high, CHANGE_BATCH])
            if changes and int(changes[0][0]) > self._high + 1 and self._pruned_unseen():
                assert self._version_id is not None
                self._load(version_id=self._version_id, code_bits=self._code_bits, from_snapshot=False)
                return
            if len(changes) >= CHANGE_BATCH and self._backlog() > RELOAD_BACKLOG:
                assert self._version_id is not None
                self._load(version_id=self._version_id, code_bits=self._code_bits, from_snapshot=False)
                return
            late = self._gaps_filled(running=running)
            self._note_gaps(ids=[int(row[0]) for row in changes], running=running)
            todo = [*late, *changes]
            # A "card" change (what a result card shows) moves no code: only the cards forget it.
            moved = [row for row in todo if row[4] != CARD_CHANGE]
            embedding_ids = {int(e) for _, e, _, v, _ in moved if e is not None and v == self._version_id}
            product_ids = {int(p) for _, e, p, _, _ in moved if e is None and p is not None}
            self.cards.forget(
                embedding_ids=(int(e) for _, e, _, _, _ in todo if e is not None),
                product_ids=(int(p) for _, e, p, _, _ in todo if e is None and p is not None),
                everything=any(op == CARD_CHANGE and e is None and p is None for _, e, p, _, op in todo),
            )
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

    def _gaps_filled(self, *, running: frozenset[int]) -> list[tuple]:
        """The missing changes of transactions that have ended since (committed: their rows are visible now), read
        in one query; the rest stay with the transactions still running, or are forgotten when none is."""
        ended = [holders for holders in self._gaps if not holders <= running]
        if not ended:
            return []  # the common poll: nothing to ask
        ids = sorted(set().union(*(self._gaps[holders] for holders in ended)))
        found, running_now = _changes_read("id = ANY(%s)", [ids])
        seen = {int(row[0]) for row in found}
        for holders in ended:
            missing = self._gaps.pop(holders) - seen
            still = holders & running_now
            if missing and still:
                self._gaps.setdefault(still, set()).update(missing)
        return found

    def _note_gaps(self, *, ids: list[int], running: frozenset[int]) -> None:
        """Ids skipped by a read belong to transactions running in its snapshot (or to rollbacks, if none is)."""
        for change_id in ids:
            if change_id > self._high + 1 and running:
                self._gaps.setdefault(running, set()).update(range(self._high + 1, change_id))
            self._high = max(self._high, change_id)

    def _apply(self, *, embedding_ids: set[int], product_ids: set[int]) -> None:
        """Re-read the current rows of everything the changes name: upsert what is visible, hide the rest."""
        if not embedding_ids and not product_ids:
            return
        rows = self._rows
        assert rows is not None and self._version_id is not None
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT e.id, e.product_id, p.merchant_id, p.active, ({code_sql('e.code', self._code_bits)})::text, "
                f"{'e.fc7::text' if rows.fc7_dim else 'NULL'} "
                "FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id "
                "WHERE e.model_version_id = %s AND (e.id = ANY(%s) OR e.product_id = ANY(%s))",
                [self._version_id, sorted(embedding_ids), sorted(product_ids)],
            )
            current = cursor.fetchall()
        seen: set[int] = set()
        for embedding_id, product_id, merchant_id, active, bits, fc7 in current:
            seen.add(embedding_id)
            if active:
                vector = np.fromstring(fc7.strip("[]"), np.float32, sep=",") if fc7 else None
                self._upsert(embedding_id, product_id, merchant_id, bitstring_pack(bits), vector)
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

    def _upsert(
        self, embedding_id: int, product_id: int, merchant_id: int, code: np.ndarray, fc7: np.ndarray | None
    ) -> None:
        rows = self._rows
        assert rows is not None
        row = self._row_of(embedding_id)
        if row is None:
            rows.reserve(rows.size + 1)
            row = rows.size
            rows.size += 1
            self._appended[embedding_id] = row
        else:
            self._snapshot_keep(rows, row)
            if not rows.alive[row]:
                self._dead -= 1
        rows.codes[row] = code
        if rows.fc7_dim:
            rows.fc7[row] = fc7
        rows.embedding_ids[row] = embedding_id
        rows.product_ids[row] = product_id
        rows.merchant_ids[row] = merchant_id
        rows.alive[row] = True

    def _hide(self, embedding_id: int) -> None:
        rows = self._rows
        assert rows is not None
        row = self._row_of(embedding_id)
        if row is not None and rows.alive[row]:
            self._snapshot_keep(rows, row)
            rows.alive[row] = False
            self._dead += 1

    def _compact(self) -> None:
        rows = self._rows
        assert rows is not None
        keep = np.flatnonzero(rows.alive[: rows.size])
        compacted = _Rows(code_bytes=rows.code_bytes, fc7_dim=rows.fc7_dim)
        compacted.reserve(len(keep))
        compacted.size = len(keep)
        for name in _Rows.COLUMNS:
            getattr(compacted, name)[: len(keep)] = getattr(rows, name)[keep]
        self._rows = compacted
        self._dead = 0
        self._index_rows()


def _snapshot_store(pending: snapshot.Pending, writing: _SnapshotWrite) -> None:
    """The snapshot thread: write the file (failures are logged there), then let the next write start."""
    try:
        started = time.perf_counter()
        if snapshot.store(pending, columns=writing.columns, changed=writing.changed):
            logger.info("coarse index: wrote the snapshot of version %s (%d codes) in %.2f s", pending.version_id,
                        pending.size, time.perf_counter() - started)  # fmt: skip
    finally:
        writing.changed()  # (if the write failed before asking: nothing more is kept)
        _SNAPSHOT_WRITER.release()


def _changes_read(where: str, params: list) -> tuple[list[tuple], frozenset[int]]:
    """Change rows (id, embedding_id, product_id, model_version_id, op) and the transactions running in the
    snapshot that read them: one statement, so the two agree."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, {_SNAPSHOT_SQL}, NULL::varchar UNION ALL "
            "(SELECT id, embedding_id, product_id, model_version_id, NULL, op "
            f"FROM catalog_indexchange WHERE {where})",
            params,
        )
        found = cursor.fetchall()
    snapshot = next(row[4] for row in found if row[4] is not None)
    changes = sorted(((*row[:4], row[5]) for row in found if row[4] is None), key=lambda row: row[0])
    return changes, _running_transactions(snapshot)


# The statement's snapshot ('xmin:xmax:xip,...'), then '|' and the transactions then running in other databases of
# the server: a snapshot lists every database's, which cannot hold our changes. A transaction that ends before
# pg_stat_activity is read is not listed there and so stays a possible holder: the catch-up stays exact.
# (pg_stat_activity is read only when some transaction is running: an empty list ends the snapshot with ':'.)
_SNAPSHOT_SQL = (
    "pg_current_snapshot()::text || '|' || CASE WHEN pg_current_snapshot()::text LIKE '%%:' THEN '' ELSE "
    "coalesce((SELECT string_agg(backend_xid::text, ',') FROM pg_stat_activity "
    "WHERE backend_xid IS NOT NULL AND datname IS DISTINCT FROM current_database()), '') END"
)


def _running_transactions(snapshot: str) -> frozenset[int]:
    """The transactions (xid8) of this database in progress, from what _SNAPSHOT_SQL returns."""
    current, elsewhere = snapshot.split("|")
    other = {int(xid) for xid in elsewhere.split(",") if xid}  # 32-bit xids
    running = (int(xid) for xid in current.split(":")[2].split(",") if xid)
    return frozenset(xid for xid in running if xid % 2**32 not in other)


def _one_thread() -> None:
    """One query runs on one core. faiss's kernels open an OpenMP parallel region per block of 65k codes even for a
    single query; with a second thread that has nothing to do, each region's hand-off cost up to milliseconds on a
    busy machine (1M codes: coarse p50 28 ms instead of 1.6). The setting is per calling thread in OpenMP, so it
    is made on every call (it costs nothing), in whichever web thread searches."""
    faiss.omp_set_num_threads(1)


def _fc7_dim(version_id: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT fc7_dim FROM catalog_modelversion WHERE id = %s", [version_id])
        found = cursor.fetchone()
    return int(found[0]) if found else 0


def _copy_version_rows(*, version_id: int, code_bits: int, fc7_dim: int) -> _Rows:
    """All visible embeddings of a version in one binary COPY, parsed by numpy a slice at a time straight into the
    index's arrays (fc7 only when `fc7_dim`).

    The stream is never held whole: COPY_PARSE_BYTES of it at a time are viewed as fixed-size rows and copied into
    arrays sized once from the version's row count, so the load's peak memory is the index plus one slice (before,
    the whole stream, a copy of it and per-column copies were held at once: ~4x the index at 1M rows with fc7)."""
    code_bytes = (code_bits + 7) // 8
    sql = (
        f"COPY (SELECT e.id, e.product_id, p.merchant_id, {code_sql('e.code', code_bits)}"
        f"{', e.fc7' if fc7_dim else ''} "
        "FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id "
        f"WHERE {version_sql('e', version_id)} AND p.active) TO STDOUT (FORMAT BINARY)"
    )
    # Binary COPY: 19-byte header, then per row int16 field count and (int32 length, bytes) per field, then -1.
    row_type = np.dtype(
        [
            ("fields", ">i2"),
            ("id_len", ">i4"), ("id", ">i8"),
            ("product_len", ">i4"), ("product", ">i8"),
            ("merchant_len", ">i4"), ("merchant", ">i8"),
            ("code_len", ">i4"), ("code_bits", ">i4"), ("code", np.uint8, (code_bytes,)),
            # pgvector's binary form: int16 dimensions, int16 unused, float4s
            *([("fc7_len", ">i4"), ("fc7_dim", ">i2"), ("fc7_unused", ">i2"), ("fc7", ">f4", (fc7_dim,))]
              if fc7_dim else []),
        ]
    )  # fmt: skip
    expected = {"fields": 5 if fc7_dim else 4, "id_len": 8, "product_len": 8, "merchant_len": 8,
                "code_len": 4 + code_bytes, "code_bits": code_bits,
                **({"fc7_len": 4 + 4 * fc7_dim, "fc7_dim": fc7_dim} if fc7_dim else {})}  # fmt: skip
    rows = _Rows(code_bytes=code_bytes, fc7_dim=fc7_dim)
    with connection.cursor() as cursor:  # an upper bound (inactive products' rows are not copied): sized once
        cursor.execute(f"SELECT count(*) FROM catalog_imageembedding e WHERE {version_sql('e', version_id)}")
        rows.reserve(int(cursor.fetchone()[0]))

    def parse(data: memoryview) -> None:
        table = np.frombuffer(data, dtype=row_type)
        for name, value in expected.items():
            if len(table) and (table[name] != value).any():
                raise ValueError(f"version {version_id}: a copied row's {name} is not {value}")
        start, stop = rows.size, rows.size + len(table)
        rows.reserve(stop)  # (only if rows were added since the count)
        rows.embedding_ids[start:stop] = table["id"]
        rows.product_ids[start:stop] = table["product"]
        rows.merchant_ids[start:stop] = table["merchant"]
        rows.codes[start:stop] = table["code"]
        if fc7_dim:
            rows.fc7[start:stop] = table["fc7"]
        rows.alive[start:stop] = True
        rows.size = stop

    pending = bytearray()
    header = 19
    slice_bytes = max(1, COPY_PARSE_BYTES // row_type.itemsize) * row_type.itemsize
    connection.ensure_connection()
    with connection.connection.cursor() as cursor, cursor.copy(sql) as copy:
        for chunk in copy:  # (one row per message)
            pending += chunk
            if len(pending) >= header + slice_bytes:
                parse(memoryview(pending)[header : header + slice_bytes])
                del pending[: header + slice_bytes]
                header = 0
    body = memoryview(pending)[header:]
    if len(body) < 2 or bytes(body[-2:]) != b"\xff\xff" or (len(body) - 2) % row_type.itemsize:
        raise ValueError(f"version {version_id}: the copied rows do not have the expected layout")
    parse(body[:-2])
    return rows


_ID_BITS = 48  # embedding ids below 2**48 share one int64 sort key with their distance (< 2**15)


def _within_radius(query: np.ndarray, *, rows: Any, radius: int, expected: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row within `radius` of the query and its distance, in row order (`_scan.c`). The arrays are sized for
    twice the rows the sample expects; the rare query with more is scanned again with room for all of them."""
    room = 2 * expected + 64
    while True:
        labels = np.empty(room, np.int64)
        distances = np.empty(room, np.int32)
        assert native_scan is not None
        found = native_scan.within_radius(rows.codes, rows.size, query, radius, labels, distances)
        if found <= room:
            return labels[:found], distances[:found]
        room = found


def _by_distance_then_id(distances: np.ndarray, embedding_ids: np.ndarray) -> np.ndarray:
    """The order of candidates by distance, then embedding id: one int64 key sorted (a third of np.lexsort's time
    on the ~4,000 candidates of a large shop)."""
    if len(embedding_ids) and int(embedding_ids.max()) >= 1 << _ID_BITS:
        return np.lexsort((embedding_ids, distances))
    keys = (distances.astype(np.int64) << _ID_BITS) | embedding_ids
    if len(keys) < 2 or bool((keys[1:] > keys[:-1]).all()):
        return np.arange(len(keys))  # already in order: a range scan's rows by distance when ids follow the rows
    return np.argsort(keys)


def _complete_shell_rows(sorted_distances: np.ndarray) -> int:
    """How many leading items of a sorted list surely form whole shells: all but the last shell, which a k-NN cut
    may have split."""
    if len(sorted_distances) == 0:
        return 0
    return int(np.searchsorted(sorted_distances, sorted_distances[-1], side="left"))


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
