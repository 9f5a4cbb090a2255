"""The coarse stage: Hamming search over the active version's binary codes, behind one interface.

Two backends answer `candidates(...)` with the same `CoarseCandidates` (candidates.py):
- `MemoryCodeIndex` (memory.py): the version's packed codes in this process's memory (1M x 256 bits = 32 MB),
  searched with one counting k-NN pass (faiss `hammings_knn_mc`, one core) cut into whole shells, 1.4-2.2x the
  time it takes to read the codes once (README, speed); beside them each embedding's fc7, for the fine stage
  (`fc7_rank`). Loaded from PostgreSQL with a binary COPY, then kept fresh from `catalog_indexchange` (the change
  log the database triggers write), exactly: an id a running transaction still holds is waited for until that
  transaction ends.
- `SqlCodeIndex` (sql.py): the same question asked of PostgreSQL: the version's partial HNSW index on
  `code::bit(B)` (bit_hamming_ops), with ef_search set from the candidate depth and iterative scans, and an exact
  scan whenever the index came back short, so it never silently returns fewer rows than exist.

Candidate depth is tie-aware: whole Hamming shells (every item at distance r) are taken in increasing r until a
minimum count is reached, never a cut inside a tie; a maximum count and an optional radius bound it.

Web processes import this package: numpy and faiss only, never torch (nothing from workers.ml). This module holds
the process's backends; callers take the query and answer types from catalog.hamming.candidates.
"""

from __future__ import annotations

from catalog.hamming.candidates import CoarseBackend
from catalog.hamming.memory import MemoryCodeIndex
from catalog.hamming.sql import SqlCodeIndex

MEMORY_INDEX = MemoryCodeIndex()  # one per process: the web workers' shared cache of the active version's codes
SQL_INDEX = SqlCodeIndex()
BACKENDS: dict[str, CoarseBackend] = {MEMORY_INDEX.name: MEMORY_INDEX, SQL_INDEX.name: SQL_INDEX}


def backend_get(name: str) -> CoarseBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown coarse backend {name!r}; use one of {sorted(BACKENDS)}") from None
