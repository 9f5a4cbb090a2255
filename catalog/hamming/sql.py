"""The SQL backend: the coarse question asked of PostgreSQL, through the version's partial HNSW index."""

from __future__ import annotations

import threading
import time

import numpy as np
from django.db import connection, transaction

from catalog.codes import code_sql, packed_bitstring, version_sql
from catalog.hamming.candidates import CandidateDepth, CoarseCandidates, ProductFilter, shell_cut

HNSW_EF_SEARCH_MIN = 40  # pgvector's default: below this the graph walk loses recall for nothing
HNSW_EF_SEARCH_MAX = 1_000  # pgvector's upper bound for hnsw.ef_search
SQL_SHELL_HEADROOM = 1.5  # SQL rows fetched per candidate wanted: room to finish the last shell in one query
HNSW_MAX_SCAN_TUPLES = 50_000  # iterative scans stop here; anything still short falls back to an exact scan
ROWS_COUNT_TTL_S = 60.0  # a depth that is a share of the catalog needs its size: counted at most once a minute


class SqlCodeIndex:
    """Hamming search in PostgreSQL through the version's partial HNSW index (catalog.codes)."""

    name = "sql"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counted: dict[tuple[int, int | None], tuple[float, int]] = {}

    def _rows(self, *, version_id: int, merchant_id: int | None) -> int:
        """The version's embeddings of active products (of the merchant, if any), counted at most once a minute
        per (version, merchant): the share of the catalog a depth asks for does not need the exact count."""
        key = (version_id, merchant_id)
        with self._lock:
            found = self._counted.get(key)
        if found and time.monotonic() - found[0] < ROWS_COUNT_TTL_S:
            return found[1]
        where = ProductFilter(merchant_id=merchant_id).where_sql("p")
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id"
                f" WHERE {version_sql('e', version_id)} AND {where.sql}",
                where.params,
            )
            rows = int(cursor.fetchone()[0])
        with self._lock:
            self._counted[key] = (time.monotonic(), rows)
        return rows

    def candidates(
        self, *, version_id: int, code_bits: int, code: np.ndarray, depth: CandidateDepth, product_filter: ProductFilter
    ) -> CoarseCandidates:
        if depth.share:
            depth = depth.for_rows(self._rows(version_id=version_id, merchant_id=product_filter.merchant_id))
        # Enough rows to complete the shell that reaches min_count (usually), plus one to tell whether the LIMIT cut
        # the last shell; asking for max_count would make every query walk the graph for thousands of rows.
        limit = min(depth.max_count, int(depth.min_count * SQL_SHELL_HEADROOM)) + 1
        query_bits = packed_bitstring(code, code_bits)
        where = product_filter.where_sql("p")
        radius_sql, radius_params = "", []
        # The version's partial HNSW index serves only the exact expressions catalog.codes writes.
        ordering = f"({code_sql('e.code', code_bits)} <~> {code_sql('%s', code_bits)})"
        if depth.radius is not None:
            radius_sql = f" AND {ordering} <= %s"
            radius_params = [query_bits, depth.radius]
        notes: list[str] = []
        sql = (
            "WITH hits AS MATERIALIZED ("
            f" SELECT e.id, {ordering} AS distance"
            " FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id"
            f" WHERE {version_sql('e', version_id)} AND {where.sql}{radius_sql}"
            f" ORDER BY {ordering} LIMIT %s"
            ") SELECT id, distance FROM hits ORDER BY distance, id"
        )
        params = [query_bits, *where.params, *radius_params, query_bits, limit]
        with transaction.atomic(), connection.cursor() as cursor:
            ef_search = min(HNSW_EF_SEARCH_MAX, max(HNSW_EF_SEARCH_MIN, limit))
            cursor.execute(f"SET LOCAL hnsw.ef_search = {int(ef_search)}")
            # Filters drop rows after the graph walk: keep walking until LIMIT rows pass (relaxed order is re-sorted
            # by the outer query). Without filters, strict order keeps a LIMIT beyond ef_search honest.
            mode = "strict_order" if product_filter.is_empty and depth.radius is None else "relaxed_order"
            cursor.execute(f"SET LOCAL hnsw.iterative_scan = {mode}")
            cursor.execute(f"SET LOCAL hnsw.max_scan_tuples = {max(HNSW_MAX_SCAN_TUPLES, 4 * limit)}")
            cursor.execute(sql, params)
            found = cursor.fetchall()
            exact = False
            if len(found) < limit:
                # Fewer rows than asked: either that is all there is, or the index gave up. Only an exact scan can
                # tell, and it is what a shopper is owed.
                exact = True
                notes.append("exact scan: the HNSW index returned fewer rows than asked")
                distance = f"bit_count({code_sql('e.code', code_bits)} # {code_sql('%s', code_bits)})"
                cursor.execute(
                    f"SELECT e.id, {distance} AS distance"
                    " FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id"
                    f" WHERE {version_sql('e', version_id)} AND {where.sql}"
                    + (f" AND {distance} <= %s" if depth.radius is not None else "")
                    + " ORDER BY distance, e.id LIMIT %s",
                    [query_bits, *where.params, *([query_bits, depth.radius] if depth.radius is not None else []),
                     limit],
                )  # fmt: skip
                found = cursor.fetchall()
        ids = np.asarray([row[0] for row in found], np.int64)
        distances = np.asarray([row[1] for row in found], np.int32)
        complete = len(found) < limit  # nothing was cut by the LIMIT
        taken = shell_cut(sorted_distances=distances, depth=depth, complete=complete)
        return CoarseCandidates(
            embedding_ids=ids[:taken],
            distances=distances[:taken],
            radius=int(distances[taken - 1]) if taken else -1,
            exhaustive=exact and complete,
            backend=self.name,
            searched_rows=len(found),
            notes=tuple(notes),
        )
