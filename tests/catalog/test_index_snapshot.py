"""A restarted web process reads its memory index from the snapshot file a process wrote, then replays the change
log from the snapshot's position: it must end up holding exactly what a load from PostgreSQL holds, including a
change that a transaction held open while the snapshot was taken."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from catalog.hamming import memory, snapshot
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
    settings.MODELS_DIR = tmp_path / "models"
    settings.SEARCH_INDEX_SNAPSHOTS = True


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
    index = MemoryCodeIndex()
    index.refresh(version_id=version.pk, code_bits=version.code_bits)
    return index


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

    def new_rows(code_bytes: int, dim: int) -> memory._Rows:
        return memory._Rows(code_bytes=code_bytes, fc7_dim=dim)

    assert snapshot.read(version_id=version.pk + 1000, code_bits=version.code_bits, fc7_dim=searchkit.FC7_DIM,
                         new_rows=new_rows) is None  # fmt: skip
    data = bytearray(path.with_name(path.name.replace(f"-v{version.pk}", f"-v{version.pk + 1000}")).read_bytes())
    path.write_bytes(bytes(data[:-4]))  # a truncated file
    assert _restarted(version).stats().snapshot_loads == 0
    assert _restarted(version).stats().snapshot_loads == 1  # the load from PostgreSQL wrote a whole one again
