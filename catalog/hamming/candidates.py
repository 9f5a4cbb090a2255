"""The coarse stage's question and answer, shared by both backends: how deep to look (in whole Hamming shells),
which products may come back, and the candidates found."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class CandidateDepth:
    """How many candidates the coarse stage hands to the fine stage, in whole Hamming shells."""

    min_count: int  # shells are added until at least this many candidates are taken
    max_count: int  # a shell that would overshoot this is left out (unless it is the first one: then truncated)
    radius: int | None = None  # hard limit on the Hamming distance of any candidate (the hashing papers' threshold)
    # min_count grows to this share of the rows the query may see (the shop's catalog), up to max_count: how deep
    # the codes must be searched grows with the catalog (the backend knows its size: `for_rows`).
    share: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_count <= self.max_count:
            raise ValueError(f"need 1 <= min_count <= max_count, got {self.min_count}, {self.max_count}")
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must be in [0, 1], got {self.share}")

    def for_rows(self, rows: int) -> CandidateDepth:
        """This depth for a search over `rows` visible rows: min_count raised to `share` of them, within max_count."""
        if not self.share:
            return self
        wanted = min(self.max_count, max(self.min_count, math.ceil(self.share * rows)))
        return dataclasses.replace(self, min_count=wanted, share=0.0)


@dataclass(frozen=True)
class ProductFilter:
    """Which products a query may return. The fine stage always applies all of it; coarse backends apply what they
    can cheaply (memory: merchant; SQL: everything), so that selective filters do not starve the candidates."""

    merchant_id: int | None = None
    category: str | None = None
    attributes: tuple[str, ...] = ()  # the product must have all of these
    price_min: Decimal | None = None
    price_max: Decimal | None = None
    exclude_product_id: int | None = None  # "similar products" leaves out the product it starts from

    @property
    def is_empty(self) -> bool:
        return self == ProductFilter()

    def where_sql(self, product_alias: str) -> SqlFragment:
        """SQL conditions on the product table (always active products only) and their parameters."""
        p = product_alias
        conditions: list[str] = [f"{p}.active"]
        params: list[Any] = []
        if self.merchant_id is not None:
            conditions.append(f"{p}.merchant_id = %s")
            params.append(self.merchant_id)
        if self.category:
            conditions.append(f"{p}.category = %s")
            params.append(self.category)
        if self.attributes:
            conditions.append(f"{p}.attributes @> %s::jsonb")
            params.append(_json_list(self.attributes))
        if self.price_min is not None:
            conditions.append(f"{p}.price >= %s")
            params.append(self.price_min)
        if self.price_max is not None:
            conditions.append(f"{p}.price <= %s")
            params.append(self.price_max)
        if self.exclude_product_id is not None:
            conditions.append(f"{p}.id <> %s")
            params.append(self.exclude_product_id)
        return SqlFragment(" AND ".join(conditions), params)


@dataclass(frozen=True)
class SqlFragment:
    sql: str
    params: list[Any]


@dataclass(frozen=True)
class CoarseCandidates:
    """One query's candidates, nearest shell first (ties ordered by embedding id)."""

    embedding_ids: np.ndarray  # (M,) int64
    distances: np.ndarray  # (M,) int32 Hamming distances
    radius: int  # distance of the farthest shell taken; -1 when nothing was taken
    exhaustive: bool  # True when every visible row within the radius was considered (widening cannot add more)
    backend: str
    searched_rows: int  # rows the backend could have returned (memory: visible rows; SQL: rows it scanned for)
    notes: tuple[str, ...] = ()  # what the backend had to do (e.g. "exact scan: the HNSW index came back short")
    # The memory backend: where each candidate is in its arrays, so that the fine stage need not look them up
    # (fc7_rank checks they still hold the same embeddings). None for the SQL backend.
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.embedding_ids)


class CoarseBackend(Protocol):
    name: str

    def candidates(
        self, *, version_id: int, code_bits: int, code: np.ndarray, depth: CandidateDepth, product_filter: ProductFilter
    ) -> CoarseCandidates: ...


def shell_cut(*, sorted_distances: np.ndarray, depth: CandidateDepth, complete: bool) -> int:
    """How many leading items of a distance-sorted list form whole shells under `depth`.

    `complete` says the list holds every item of its last shell; if not (a list cut at a LIMIT), that last shell is
    never taken whole, because part of it is missing.
    """
    d = np.asarray(sorted_distances)
    if depth.radius is not None:
        d = d[: int(np.searchsorted(d, depth.radius, side="right"))]
        complete = complete or len(d) < len(sorted_distances)
    if len(d) == 0:
        return 0
    # Shells are runs of equal distances: each is found by a binary search, not by walking the list.
    if len(d) < depth.min_count:  # every shell here is needed; the last only if it is whole
        taken = len(d) if complete else int(np.searchsorted(d, d[-1], side="left"))
        if taken == 0 and not complete:
            return min(len(d), depth.max_count)  # only a partial first shell: some candidates beat none
        return taken
    last = d[depth.min_count - 1]  # the shell that reaches min_count
    end = int(np.searchsorted(d, last, side="right"))
    if end == len(d) and not complete:  # that shell may go on past the list: it is not taken
        end = -1
    if end != -1 and end <= depth.max_count:
        return end
    start = int(np.searchsorted(d, last, side="left"))  # the shells before it
    if start:
        return start
    return depth.max_count if end != -1 else min(len(d), depth.max_count)  # a lone first shell, truncated


def _json_list(values: tuple[str, ...]) -> str:
    return json.dumps(sorted(values))
