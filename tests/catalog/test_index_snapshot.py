"""A restarted web process reads its memory index from the snapshot file a process wrote, then replays the change
log from the snapshot's position: it must end up holding exactly what a load from PostgreSQL holds, including a
change that a transaction held open while the snapshot was taken. The file is written by a thread of its own:
searches go on while it is written, and it is still the index as it was when the write began."""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

import numpy as np
import pytest

from catalog.hamming import memory, snapshot
from catalog.hamming.candidates import CandidateDepth, ProductFilter
from catalog.hamming.memory import MemoryCodeIndex
from catalog.models import ImageEmbedding
from catalog.services import maintenance
from tests import factories
from tests.catalog import searchkit
from tests.catalog.other_transaction import OtherTransaction
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _models_dir(settings, tmp_path):
    assert MemoryCodeIndex.wait_snapshot(timeout=30.0)  # (one an earlier test's search started)
    settings.MODELS_DIR = tmp_path / "models"
    settings.SEARCH_INDEX_SNAPSHOTS = True
    yield
    assert MemoryCodeIndex.wait_snapshot(timeout=30.0)


class _HeldWrites:
    """The real `snapshot.store`, each call held until `release()`: a snapshot write as slow as the test wants (the
    rows are read only after it is released, so a row the index changes meanwhile is read changed)."""

    def __init__(self, monkeypatch) -> None:
        self.started, self.released, self.done = threading.Event(), threading.Event(), threading.Event()
        store = snapshot.store

        def held(pending, **kwargs) -> bool:
            self.started.set()
            self.released.wait(timeout=30.0)
            try:
                return store(pending, **kwargs)
            finally:
                self.done.set()

        monkeypatch.setattr(snapshot, "store", held)

    def release(self) -> None:
        self.released.set()
        assert MemoryCodeIndex.wait_snapshot(timeout=30.0)


def _content(index: MemoryCodeIndex) -> dict[int, tuple]:
    """Every visible row: embedding id -> (product, merchant, code bytes, fc7 bytes)."""
    rows = index._rows
    assert rows is not None
    return {
        int(rows.embedding_ids[at]): (int(rows.product_ids[at]), int(rows.merchant_ids[at]), rows.codes[at].tobytes(),
                                      rows.fc7[at].tobytes())
        for at in np.flatnonzero(rows.alive[: rows.size])
    }  # fmt: skip


def _from_sql(version) -> MemoryCodeIndex:
    index = MemoryCodeIndex()
    index._load(version_id=version.pk, code_bits=version.code_bits, from_snapshot=False)
    return index


def _restarted(version) -> MemoryCodeIndex:
    """A new process's index after its first search, once the snapshot that search started is written."""
    index = MemoryCodeIndex()
    index.refresh(version_id=version.pk, code_bits=version.code_bits)
    assert index.wait_snapshot(timeout=30.0)
    return index


def _new_rows(code_bytes: int, dim: int) -> memory._Rows:
    return memory._Rows(code_bytes=code_bytes, fc7_dim=dim)


def _stored_content(version) -> tuple[dict[int, tuple], int]:
    """The rows of the snapshot file (as `_content` gives an index's) and the change it ends at."""
    stored = snapshot.read(
        version_id=version.pk, code_bits=version.code_bits, fc7_dim=searchkit.FC7_DIM, new_rows=_new_rows
    )
    assert stored is not None
    index = MemoryCodeIndex()
    index._rows = stored.rows
    return _content(index), stored.high


def _search(index: MemoryCodeIndex, version, code: np.ndarray) -> set[int]:
    depth = CandidateDepth(min_count=100, max_count=100)
    found = index.candidates(
        version_id=version.pk, code_bits=version.code_bits, code=code, depth=depth, product_filter=ProductFilter()
    )
    return set(found.embedding_ids.tolist())


def test_a_restart_reads_the_snapshot_and_replays_what_changed_since():
    version = searchkit.active_version()
    merchant = factories.merchant()
    catalog = searchkit.random_catalog(merchant=merchant, version=version, count=6, images=2)
    first = _restarted(version)  # no snapshot yet: PostgreSQL, then one is written
    assert first.stats().snapshot_loads == 0 and list(snapshot.directory().glob("*.index"))

    # Changes after the snapshot: a new product, a deleted embedding, a hidden product, a re-embedded image.
    searchkit.random_catalog(merchant=merchant, version=version, count=2, seed=7)
    catalog[0].embeddings[0].delete()
    catalog[1].product.active = False
    catalog[1].product.save()
    moved = catalog[2].embeddings[1]
    moved.fc7 = searchkit.unit(np.arange(searchkit.FC7_DIM, dtype=np.float32))
    moved.code = "1" * version.code_bits
    moved.save()

    restarted = _restarted(version)
    stats = restarted.stats()
    assert stats.snapshot_loads == 1 and stats.full_loads == 1 and stats.applied_changes > 0
    assert _content(restarted) == _content(_from_sql(version))
    assert len(_content(restarted)) == 6 * 2 - 1 - 2 + 2
    assert restarted.stats().change_id == _from_sql(version).stats().change_id


def test_a_change_held_open_while_the_snapshot_was_taken_arrives_after_the_restart():
    version = searchkit.active_version()
    merchant = factories.merchant()
    searchkit.random_catalog(merchant=merchant, version=version, count=4)
    bits = searchkit.random_bits(np.random.default_rng(5))

    def slow_write() -> int:
        planted = searchkit.product_with_embeddings(
            merchant=merchant, version=version, sku="SLOW", encodings=[(bits, np.ones(searchkit.FC7_DIM))]
        )
        return planted.embeddings[0].pk

    with OtherTransaction(slow_write) as slow:
        searchkit.random_catalog(merchant=merchant, version=version, count=1, seed=3)  # commits past the slow id
        writer = _restarted(version)  # loads from PostgreSQL and writes the snapshot with the slow id awaited
        assert writer.stats().pending_changes >= 1 and slow.result not in _content(writer)
        slow.commit()
    wait_until(lambda: ImageEmbedding.objects.filter(pk=slow.result).exists(), timeout=5.0, interval=0.02,
               message="the slow transaction did not commit")  # fmt: skip

    restarted = _restarted(version)
    assert restarted.stats().snapshot_loads == 1
    assert slow.result in _content(restarted)
    assert restarted.stats().pending_changes == 0
    assert _content(restarted) == _content(_from_sql(version))


def test_a_snapshot_whose_position_was_pruned_is_not_used():
    version = searchkit.active_version()
    merchant = factories.merchant()
    catalog = searchkit.random_catalog(merchant=merchant, version=version, count=3)
    _restarted(version)
    catalog[0].product.delete()
    maintenance.index_changes_prune(older_than=timedelta(0))  # the snapshot's position and the deletion are gone

    restarted = _restarted(version)
    assert restarted.stats().snapshot_loads == 0 and restarted.stats().full_loads == 1
    assert _content(restarted) == _content(_from_sql(version))
    assert len(_content(restarted)) == 2


def test_a_snapshot_of_other_sizes_or_another_database_is_not_used(settings):
    version = searchkit.active_version()
    searchkit.random_catalog(merchant=factories.merchant(), version=version, count=3)
    _restarted(version)
    settings.SEARCH_FC7_IN_MEMORY = False  # the snapshot holds fc7; this process wants none
    assert _restarted(version).stats().snapshot_loads == 0
    settings.SEARCH_FC7_IN_MEMORY = True
    _restarted(version)  # (rewritten with fc7)

    (path,) = snapshot.directory().glob("*.index")
    path.rename(path.with_name(path.name.replace(f"-v{version.pk}", f"-v{version.pk + 1000}")))

    assert snapshot.read(version_id=version.pk + 1000, code_bits=version.code_bits, fc7_dim=searchkit.FC7_DIM,
                         new_rows=_new_rows) is None  # fmt: skip
    data = bytearray(path.with_name(path.name.replace(f"-v{version.pk}", f"-v{version.pk + 1000}")).read_bytes())
    path.write_bytes(bytes(data[:-4]))  # a truncated file
    assert _restarted(version).stats().snapshot_loads == 0
    assert _restarted(version).stats().snapshot_loads == 1  # the load from PostgreSQL wrote a whole one again


def test_the_first_search_does_not_wait_for_the_snapshot_of_its_load(monkeypatch):
    version = searchkit.active_version()
    catalog = searchkit.random_catalog(merchant=factories.merchant(), version=version, count=3)
    held = _HeldWrites(monkeypatch)
    index = MemoryCodeIndex()
    found = _search(index, version, np.zeros(version.code_bits // 8, np.uint8))  # loads from PostgreSQL
    assert found == {e.pk for planted in catalog for e in planted.embeddings}
    assert held.started.wait(5.0) and not held.done.is_set()  # answered while the write is held
    assert not list(snapshot.directory().glob("*.index"))
    held.release()
    assert _restarted(version).stats().snapshot_loads == 1


def test_searches_go_on_during_a_snapshot_refresh_which_stores_the_index_as_it_began(monkeypatch):
    """The write is held while the index hides rows and rewrites rows in place, appends past its arrays (which
    grow), then compacts: every search answers meanwhile, and the file is the index at the write's position."""
    monkeypatch.setattr(memory, "MIN_CAPACITY", 4)  # (small arrays: a few more rows grow them)
    version = searchkit.active_version()
    merchant = factories.merchant()
    catalog = searchkit.random_catalog(merchant=merchant, version=version, count=8, images=2)
    index = _restarted(version)  # loaded, and its first snapshot written

    held = _HeldWrites(monkeypatch)
    monkeypatch.setattr(memory, "SNAPSHOT_CHECK_S", 0.0)
    monkeypatch.setattr(memory, "SNAPSHOT_REFRESH_S", -1.0)  # the file on disk is due for a rewrite at once
    index.refresh(version_id=version.pk, code_bits=version.code_bits)
    assert held.started.wait(5.0)
    began, began_at, rows_began = _content(index), index.stats().change_id, index._rows
    writing = index._snapshot_writing
    assert writing is not None and writing.columns["codes"] is rows_began.codes

    # In place: a deleted embedding, a re-embedded one. Appended: new products, past the arrays' capacity.
    catalog[0].embeddings[0].delete()
    moved = catalog[2].embeddings[1]
    moved.fc7 = searchkit.unit(np.arange(searchkit.FC7_DIM, dtype=np.float32))
    moved.code = "1" * version.code_bits
    moved.save()
    added = searchkit.random_catalog(merchant=merchant, version=version, count=3, seed=7)
    ones = np.full(version.code_bits // 8, 255, np.uint8)
    assert moved.pk in _search(index, version, ones)
    assert index._rows is rows_began and index._rows.codes is not writing.columns["codes"]  # (they grew)
    # Enough rows hidden for a compaction: new arrays again. Then a row of those changes.
    catalog[1].product.active = False
    catalog[1].product.save()
    catalog[3].product.delete()
    _search(index, version, ones)
    assert index._rows is not rows_began and index.stats().dead_rows == 0
    added[0].embeddings[0].delete()

    live = set(_content(_from_sql(version)))
    assert _search(index, version, ones) == live and set(_content(index)) == live
    assert not held.done.is_set()  # every search above answered while the write was held
    monkeypatch.setattr(memory, "SNAPSHOT_CHECK_S", 3600.0)  # (no other write once this one ends)
    held.released.set()
    deadline = time.monotonic() + 20.0
    while not held.done.is_set() and time.monotonic() < deadline:  # polls back to back do not starve the write
        index.refresh(version_id=version.pk, code_bits=version.code_bits)
    assert held.done.is_set() and index.wait_snapshot(timeout=5.0)
    assert _stored_content(version) == (began, began_at)
    restarted = _restarted(version)
    assert restarted.stats().snapshot_loads == 1
    assert _content(restarted) == _content(_from_sql(version))


def test_a_failing_snapshot_write_is_logged_and_searches_go_on(settings, tmp_path, monkeypatch, caplog):
    version = searchkit.active_version()
    catalog = searchkit.random_catalog(merchant=factories.merchant(), version=version, count=3)
    everything = {e.pk for planted in catalog for e in planted.embeddings}
    settings.MODELS_DIR = tmp_path / "a-file"  # the snapshot folder cannot be made under a file
    settings.MODELS_DIR.write_text("not a folder")
    monkeypatch.setattr(memory, "SNAPSHOT_CHECK_S", 0.0)
    index = MemoryCodeIndex()
    zeros = np.zeros(version.code_bits // 8, np.uint8)
    with caplog.at_level(logging.ERROR, logger="catalog.hamming.snapshot"):
        for _ in range(2):  # the load's write fails; the next search's is tried again (no file's age) and fails
            assert _search(index, version, zeros) == everything
            assert index.wait_snapshot(timeout=30.0)
    failed = [record for record in caplog.records if "could not write the snapshot" in record.getMessage()]
    assert len(failed) == 2 and all(record.exc_info for record in failed)

    settings.MODELS_DIR = tmp_path / "models"
    assert _search(index, version, zeros) == everything
    assert index.wait_snapshot(timeout=30.0)
    assert _restarted(version).stats().snapshot_loads == 1


def test_a_write_removes_the_temporary_file_of_a_process_that_exited_mid_write(monkeypatch):
    version = searchkit.active_version()
    searchkit.random_catalog(merchant=factories.merchant(), version=version, count=2)
    index = _restarted(version)
    (path,) = snapshot.directory().glob("*.index")
    left, writing = path.with_name(f".{path.name}.left"), path.with_name(f".{path.name}.writing")  # (mkstemp's names)
    left.write_bytes(b"half a snapshot")
    old = time.time() - snapshot.ABANDONED_S - 60
    os.utime(left, (old, old))
    writing.write_bytes(b"another process is writing this one")
    monkeypatch.setattr(memory, "SNAPSHOT_CHECK_S", 0.0)
    monkeypatch.setattr(memory, "SNAPSHOT_REFRESH_S", -1.0)
    index.refresh(version_id=version.pk, code_bits=version.code_bits)
    assert index.wait_snapshot(timeout=30.0)
    assert not left.exists() and writing.exists() and path.exists()
