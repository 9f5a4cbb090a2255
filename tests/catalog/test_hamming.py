"""Coarse-stage internals: the tie-aware shell rules against the numpy reference, and the in-memory index's
change-log replay when transactions commit out of order (real PostgreSQL, two real connections)."""

import time

import numpy as np
import pytest
from django.db import connection

from catalog import hamming
from catalog.hamming import memory
from catalog.hamming.candidates import CandidateDepth, ProductFilter, shell_cut
from tests import factories
from tests.catalog import searchkit
from tests.catalog.other_transaction import OtherTransaction
from tests.waiting import wait_until
from workers.ml.codes import select_shells


@pytest.mark.parametrize("seed", range(40))
def test_histogram_shells_match_the_reference_selection(seed):
    rng = np.random.default_rng(seed)
    code_bits = int(rng.choice([8, 16, 32]))
    distances = rng.binomial(code_bits, rng.uniform(0.2, 0.5), int(rng.integers(1, 400))).astype(np.int32)
    min_count = int(rng.integers(1, 60))
    depth = CandidateDepth(
        min_count=min_count,
        max_count=min_count + int(rng.integers(0, 80)),
        radius=None if seed % 3 else int(rng.integers(0, code_bits)),
    )

    rows, radius = memory._shells_from_histogram(distances, code_bits=code_bits, depth=depth)
    reference = select_shells(distances, min_count=depth.min_count, max_count=depth.max_count, radius=depth.radius)

    assert len(rows) == len(reference.indices) and radius == reference.radius
    if len(rows) and len(set(distances[rows])) > 1 or len(rows) == (distances <= radius).sum():
        assert set(rows.tolist()) == set(reference.indices.tolist())  # (a truncated lone shell may differ in members)

    sorted_distances = np.sort(distances)
    assert shell_cut(sorted_distances=sorted_distances, depth=depth, complete=True) == len(reference.indices)


def test_a_list_cut_inside_a_shell_drops_that_shell():
    depth = CandidateDepth(min_count=3, max_count=10)
    # 0, 1, 1 | 2, 2 (the LIMIT cut here: more 2s may exist)
    assert shell_cut(sorted_distances=np.array([0, 1, 1, 2, 2]), depth=depth, complete=False) == 3
    # only part of the first shell came back: something beats nothing
    assert shell_cut(sorted_distances=np.array([4, 4, 4]), depth=depth, complete=False) == 3


def test_depth_rejects_nonsense():
    with pytest.raises(ValueError):
        CandidateDepth(min_count=5, max_count=4)


def _search_ids(version, bits) -> set[int]:
    found = hamming.MEMORY_INDEX.candidates(
        version_id=version.pk,
        code_bits=version.code_bits,
        code=np.packbits(bits),
        depth=CandidateDepth(min_count=1000, max_count=1000),
        product_filter=ProductFilter(),
    )
    return set(found.embedding_ids.tolist())


@pytest.mark.django_db(transaction=True)
def test_a_change_committed_after_a_later_one_is_still_applied():
    """Change ids are taken at insert and become visible at commit: a reader that only followed the highest id seen
    would lose the slower transaction's change for ever."""
    version = searchkit.active_version()
    merchant = factories.merchant()
    rng = np.random.default_rng(0)
    bits = searchkit.random_bits(rng)
    searchkit.random_catalog(merchant=merchant, version=version, count=5)
    hamming.MEMORY_INDEX.refresh(version_id=version.pk, code_bits=version.code_bits)
    loads = hamming.MEMORY_INDEX.stats().full_loads

    def slow_write() -> int:
        planted = searchkit.product_with_embeddings(
            merchant=merchant, version=version, sku="SLOW", encodings=[(bits, np.ones(searchkit.FC7_DIM))]
        )
        return planted.embeddings[0].pk

    with OtherTransaction(slow_write) as slow:
        fast = searchkit.product_with_embeddings(
            merchant=merchant, version=version, sku="FAST", encodings=[(bits, np.ones(searchkit.FC7_DIM))]
        )  # commits now, with a higher change id than the slow one
        time.sleep(memory.CHANGE_POLL_INTERVAL_S)
        seen = _search_ids(version, bits)
        assert fast.embeddings[0].pk in seen and slow.result not in seen

    wait_until(
        lambda: slow.result in _search_ids(version, bits), timeout=1.0, interval=0.02,
        message="the late commit was not applied within 1 s",
    )  # fmt: skip
    assert hamming.MEMORY_INDEX.stats().full_loads == loads  # followed the log; never reloaded


def _loaded_index(*, rng: np.random.Generator, size: int, code_bits: int) -> memory.MemoryCodeIndex:
    """An index holding random rows, filled directly (the selection needs no database)."""
    index = memory.MemoryCodeIndex()
    rows = memory._Rows(code_bytes=code_bits // 8)
    rows.reserve(size)
    rows.size = size
    # Few distinct bit patterns near the query make wide ties, the case where whole shells matter.
    rows.codes[:size] = np.packbits(rng.random((size, code_bits)) < rng.uniform(0.05, 0.5), axis=1)
    rows.embedding_ids[:size] = rng.permutation(size) * 3 + 1
    rows.product_ids[:size] = rows.embedding_ids[:size] // 2
    rows.merchant_ids[:size] = rng.integers(1, 4, size)
    rows.alive[:size] = True
    index._rows, index._version_id, index._code_bits = rows, 1, code_bits
    index._index_rows()
    return index


@pytest.mark.parametrize(
    ("range_min_rows", "range_scan"),
    [(memory.RANGE_MIN_ROWS, "native"), (0, "native"), (0, "faiss")],
    ids=["as-served", "range-scan-always", "faiss-range-search-always"],
)
@pytest.mark.parametrize("seed", range(60))
def test_the_knn_pass_takes_the_same_shells_as_the_full_scan(seed, range_min_rows, range_scan, monkeypatch):
    """The counting k-NN pass (with its growth, post-filter and bitmap selector), and the range scan at an
    estimated radius that large indexes use first (the project's C scan, and faiss's range search where it is not
    built), answer exactly what the full distance pass with its histogram answers: same rows, radius,
    exhaustiveness and searched rows."""
    monkeypatch.setattr(memory, "RANGE_MIN_ROWS", range_min_rows)
    if range_scan == "faiss":
        monkeypatch.setattr(memory, "native_scan", None)
    rng = np.random.default_rng(seed)
    code_bits = int(rng.choice([32, 64, 256]))
    size = int(rng.choice([1, 40, 3_000, 30_000]))
    index = _loaded_index(rng=rng, size=size, code_bits=code_bits)
    rows = index._rows
    dead = int(rng.choice([0, 5, 2_000])) if size > 1 else 0
    for embedding_id in rng.choice(rows.embedding_ids[:size], min(dead, size // 2), replace=False):
        index._hide(int(embedding_id))
    min_count = int(rng.choice([1, 30, 400, 3_000]))
    depth = CandidateDepth(
        min_count=min_count,
        max_count=min_count * int(rng.choice([1, 2, 10])),
        radius=None if seed % 4 else int(rng.integers(0, code_bits // 2)),
    )
    product_filter = ProductFilter(
        merchant_id=int(rng.integers(1, 4)) if seed % 3 == 0 else None,
        exclude_product_id=int(rows.product_ids[0]) if seed % 5 == 0 else None,
    )
    query = np.packbits(rng.random(code_bits) < 0.2)

    fast = index.search_loaded(code=query, depth=depth, product_filter=product_filter)
    full = index._scan_all(query=query.reshape(1, -1), depth=depth, product_filter=product_filter)

    assert (fast.radius, fast.exhaustive, fast.searched_rows) == (full.radius, full.exhaustive, full.searched_rows)
    assert len(fast) == len(full)
    assert np.array_equal(fast.distances, full.distances)
    if len(full) and (full.distances[-1] != full.distances[0] or len(full) < depth.max_count):
        assert np.array_equal(fast.embedding_ids, full.embedding_ids)  # (a truncated lone shell may differ)


def test_the_range_scan_is_built():
    """scripts/venv.sh builds the C range scan (scripts/build_native.py); without it large catalogs fall back to
    faiss, slower, and this environment would not be the one the README's commands make."""
    assert memory.native_scan is not None, "catalog/hamming/_scan.c is not built: run python scripts/build_native.py"


@pytest.mark.parametrize("code_bits", [8, 24, 64, 72, 256, 512, 1024])
@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 1_001])
def test_the_range_scan_finds_every_row_within_the_radius(code_bits, size):
    """Every code length (the AVX2 path takes multiples of 32 bytes four rows at a time, the scalar loop the rest
    and the last rows), radii from 0 to the whole code, and fewer result slots than rows found."""
    rng = np.random.default_rng(code_bits * 10_007 + size)
    codes = rng.integers(0, 256, (size + 3, code_bits // 8), dtype=np.uint8)  # (rows past `size` are not scanned)
    query = rng.integers(0, 256, code_bits // 8, dtype=np.uint8)
    codes[: size // 2] ^= rng.random((size // 2, code_bits // 8)) < 0.9  # near and far rows
    codes[-1] = ~query  # the farthest code possible, past `size`
    if size:
        codes[size - 1] = ~query
    distances = np.unpackbits(codes[:size] ^ query, axis=1).sum(axis=1)
    for radius in (0, code_bits // 4, code_bits // 2, code_bits - 1, code_bits):
        want = np.flatnonzero(distances <= radius)
        found_rows, found_distances = np.empty(size, np.int64), np.empty(size, np.int32)
        count = memory.native_scan.within_radius(codes, size, query, radius, found_rows, found_distances)
        assert count == len(want)
        assert np.array_equal(found_rows[:count], want)
        assert np.array_equal(found_distances[:count], distances[want])
        one_slot = np.zeros(1, np.int64), np.zeros(1, np.int32)
        assert memory.native_scan.within_radius(codes, size, query, radius, *one_slot) == len(want)
        if len(want):
            assert (one_slot[0][0], one_slot[1][0]) == (want[0], distances[want[0]])


def test_the_range_scan_rejects_arrays_that_do_not_fit():
    codes = np.zeros((10, 32), np.uint8)
    rows, distances = np.empty(10, np.int64), np.empty(10, np.int32)
    with pytest.raises(ValueError):
        memory.native_scan.within_radius(codes, 11, np.zeros(32, np.uint8), 5, rows, distances)  # rows past the end
    with pytest.raises(ValueError):
        memory.native_scan.within_radius(codes, 2**62, np.zeros(32, np.uint8), 5, rows, distances)  # no overflow
    with pytest.raises(ValueError):
        memory.native_scan.within_radius(codes, 10, np.zeros(32, np.uint8), -1, rows, distances)
    with pytest.raises(ValueError):
        memory.native_scan.within_radius(codes, 10, np.zeros(0, np.uint8), 5, rows, distances)
    with pytest.raises(TypeError):
        memory.native_scan.within_radius(codes, 10, np.zeros(32, np.uint8), 5, bytes(80), distances)  # read-only


def test_a_range_scan_finding_more_rows_than_expected_is_run_again_with_room_for_all():
    rng = np.random.default_rng(3)
    index = _loaded_index(rng=rng, size=5_000, code_bits=256)
    query = index._rows.codes[:1].copy()
    labels, distances = memory._within_radius(query, rows=index._rows, radius=128, expected=0)  # room for 64
    reference = np.unpackbits(index._rows.codes[: index._rows.size] ^ query, axis=1).sum(axis=1)
    assert len(labels) > 64
    assert np.array_equal(labels, np.flatnonzero(reference <= 128))
    assert np.array_equal(distances, reference[labels])


LATER_CHANGES = 1_500  # more than the 1,000 ids the catch-up used to look back


def _changes_commit(count: int) -> None:
    """Commit `count` harmless changes (for products that do not exist) in one statement."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO catalog_indexchange (op, product_id, created_at) "
            "SELECT 'product', -g, now() FROM generate_series(1, %s) g",
            [count],
        )


def _slow_product(merchant, version, bits):
    def write() -> int:
        planted = searchkit.product_with_embeddings(
            merchant=merchant, version=version, sku="SLOW", encodings=[(bits, np.ones(searchkit.FC7_DIM))]
        )
        return planted.embeddings[0].pk

    return write


@pytest.mark.django_db(transaction=True)
def test_a_long_transaction_is_caught_up_exactly_however_many_changes_commit_meanwhile():
    """Issue 12: a change held by a transaction that stays open while more than a thousand later changes commit
    (and any length of time passes) is applied as soon as it commits, with no reload."""
    version = searchkit.active_version()
    merchant = factories.merchant()
    bits = searchkit.random_bits(np.random.default_rng(1))
    searchkit.random_catalog(merchant=merchant, version=version, count=5)
    hamming.MEMORY_INDEX.refresh(version_id=version.pk, code_bits=version.code_bits)
    loads = hamming.MEMORY_INDEX.stats().full_loads

    with OtherTransaction(_slow_product(merchant, version, bits)) as slow:
        _changes_commit(LATER_CHANGES)
        assert slow.result not in _search_ids(version, bits)
        _changes_commit(LATER_CHANGES)  # the gap is now far behind the newest change
        assert slow.result not in _search_ids(version, bits)
        assert hamming.MEMORY_INDEX.stats().pending_changes >= 1  # still waited for, not forgotten
        slow.commit()
        wait_until(
            lambda: slow.result in _search_ids(version, bits), timeout=2.0, interval=0.02,
            message="the long transaction's product did not become searchable after its commit",
        )  # fmt: skip
    stats = hamming.MEMORY_INDEX.stats()
    assert stats.full_loads == loads and stats.pending_changes == 0


@pytest.mark.django_db(transaction=True)
def test_a_transaction_running_while_the_index_loads_is_caught_up():
    version = searchkit.active_version()
    merchant = factories.merchant()
    bits = searchkit.random_bits(np.random.default_rng(2))
    searchkit.random_catalog(merchant=merchant, version=version, count=5)

    with OtherTransaction(_slow_product(merchant, version, bits)) as slow:
        _changes_commit(LATER_CHANGES)  # the slow change's id is now a hole below the newest
        hamming.MEMORY_INDEX.clear()
        hamming.MEMORY_INDEX.refresh(version_id=version.pk, code_bits=version.code_bits)
        assert slow.result not in _search_ids(version, bits)
        slow.commit()
        wait_until(
            lambda: slow.result in _search_ids(version, bits), timeout=2.0, interval=0.02,
            message="a transaction running during the load was not caught up after its commit",
        )  # fmt: skip
    assert hamming.MEMORY_INDEX.stats().full_loads == 1


@pytest.mark.django_db(transaction=True)
def test_a_rolled_back_change_is_forgotten_once_its_transaction_ends():
    version = searchkit.active_version()
    merchant = factories.merchant()
    bits = searchkit.random_bits(np.random.default_rng(3))
    searchkit.random_catalog(merchant=merchant, version=version, count=5)
    hamming.MEMORY_INDEX.refresh(version_id=version.pk, code_bits=version.code_bits)

    with OtherTransaction(_slow_product(merchant, version, bits)) as slow:
        _changes_commit(10)
        _search_ids(version, bits)
        assert hamming.MEMORY_INDEX.stats().pending_changes >= 1
        slow.roll_back()
        assert slow.result not in _search_ids(version, bits)
        assert hamming.MEMORY_INDEX.stats().pending_changes == 0


def _sql_rows(version) -> dict[int, tuple[int, int, np.ndarray, np.ndarray]]:
    """What SQL holds for the version's visible embeddings, read as text (no binary parsing involved)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT e.id, e.product_id, p.merchant_id, (e.code::bit({version.code_bits}))::text, e.fc7::text "
            "FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id "
            "WHERE e.model_version_id = %s AND p.active",
            [version.pk],
        )
        return {
            embedding_id: (product_id, merchant_id, np.packbits(np.array([c == "1" for c in bits])),
                           np.array(fc7.strip("[]").split(","), np.float32))
            for embedding_id, product_id, merchant_id, bits, fc7 in cursor.fetchall()
        }  # fmt: skip


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("code_bits", "fc7_in_memory", "parse_bytes"),
    [(32, True, 1000), (60, True, 1), (256, False, 700), (256, True, 32 << 20)],
)
def test_the_loaded_index_holds_exactly_what_sql_holds(settings, monkeypatch, code_bits, fc7_in_memory, parse_bytes):
    """The load parses the binary COPY a slice at a time into arrays sized beforehand: with slices of one row, of
    a few rows (ending mid-stream), and the whole stream, every visible embedding is there once with its product,
    merchant, code and float32 fc7 as SQL returns them; inactive products' rows and other versions' are not."""
    settings.SEARCH_FC7_IN_MEMORY = fc7_in_memory
    monkeypatch.setattr(memory, "COPY_PARSE_BYTES", parse_bytes)
    version = searchkit.active_version(code_bits=code_bits, fc7_dim=24)
    other = searchkit.active_version(code_bits=code_bits, fc7_dim=24)  # retires `version`, then written to as well
    for merchant, seed in ((factories.merchant("one"), 0), (factories.merchant("two"), 1)):
        searchkit.random_catalog(merchant=merchant, version=version, count=9, seed=seed, images=2)
        searchkit.random_catalog(merchant=merchant, version=version, count=3, seed=seed + 5, active=False)
        searchkit.random_catalog(merchant=merchant, version=other, count=2, seed=seed + 9)
    index = memory.MemoryCodeIndex()
    index.refresh(version_id=version.pk, code_bits=code_bits)

    expected = _sql_rows(version)
    rows = index._rows
    assert rows is not None and rows.size == len(expected) == 36 and index.stats().rows == 36
    assert rows.codes.dtype == np.uint8 and rows.codes.shape[1] == (code_bits + 7) // 8
    assert sorted(rows.embedding_ids[: rows.size].tolist()) == sorted(expected)
    for row in range(rows.size):
        product_id, merchant_id, code, fc7 = expected[int(rows.embedding_ids[row])]
        assert (rows.product_ids[row], rows.merchant_ids[row]) == (product_id, merchant_id)
        assert np.array_equal(rows.codes[row], code)
        if fc7_in_memory:
            assert rows.fc7.dtype == np.float32 and np.array_equal(rows.fc7[row], fc7)
        else:
            assert rows.fc7.shape[1] == 0
    assert rows.alive[: rows.size].all()
    for embedding_id in expected:  # the id lookup built at load finds each row
        assert rows.embedding_ids[index._row_of(embedding_id)] == embedding_id
