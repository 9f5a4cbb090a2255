"""`manage.py bench_search`: the cascade (excluding the network) on synthetic catalogs of 10k, 100k and 1M products.

For each size and coarse backend: p50/p99 of coarse, fine and total time, recall@10 of the cascade against exact
fc7 search, and memory; printed and written as JSON. Runs in its own throwaway database on the same server (created,
migrated, bulk-loaded with binary COPY, dropped at the end), so it never touches the shop.

Synthetic data that makes recall mean something: fc7 vectors are clustered (products come in kinds), L2-normalised;
codes are signs of a random projection of fc7 plus noise (what a hash layer learns, imperfectly); a query is another
photo of a catalog product (its fc7 perturbed, its code recomputed with fresh noise).
"""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand
from django.db import connection

from catalog.codes import code_index_name
from catalog.management.bench_database import (
    INNER_FLAG,
    INNER_HELP,
    options_argv,
    refuse_outside_bench_database,
    run_inside_bench_database,
)

BENCH_DATABASE = "shop_search_bench"
CLUSTER_SIZE = 200  # products per cluster of look-alikes (a kind: "navy striped shirts")
CLUSTER_SPREAD = 0.7  # within-cluster spread relative to the distance between cluster centres
QUERY_NOISE = 0.25  # how far a shopper's photo lands from the catalog photo of the same product, in fc7
CODE_NOISE = 0.35  # noise added before the sign: an imperfect hash layer flips bits near the boundary
COPY_CHUNK = 100_000  # rows per COPY buffer: bounded memory, few round trips
WARMUP_QUERIES = 10  # first queries pay for cold caches (and the memory backend's load): not measured
TOP_K = 10  # recall@10, as the issue asks
COARSE_ONLY_CHUNK = 1_000_000  # rows of synthetic codes made at a time for --coarse-only-sizes
QUERY_BIT_FLIPS = 0.15  # --coarse-only-sizes: a query is a catalog code with this fraction of its bits flipped
FAISS_K = 1_000  # faiss's brute-force k-NN, asked for about as many rows as the coarse stage hands on


class Command(BaseCommand):
    help = "Benchmark the search cascade on synthetic catalogs (10k/100k/1M) for both coarse backends."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated catalog sizes")
        parser.add_argument("--queries", type=int, default=200, help="measured queries per size and backend")
        parser.add_argument("--code-bits", type=int, default=256)
        parser.add_argument("--fc7-dim", type=int, default=128)
        parser.add_argument("--backends", default="memory,sql")
        parser.add_argument(
            "--coarse-only-sizes",
            default="",
            help="comma-separated sizes (e.g. 10000000) at which only the memory backend's selection is measured, "
            "on codes built in this process without PostgreSQL (a catalog that size does not fit the database here)",
        )
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--min-candidates",
            default="",
            help="comma-separated COARSE_MIN_CANDIDATES to sweep (default: the module's)",
        )
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "search.json")
        parser.add_argument("--keep-database", action="store_true", help="leave the bench database for inspection")
        parser.add_argument(INNER_FLAG, action="store_true", help=INNER_HELP)

    def handle(self, *args, **options) -> None:
        if options["inside_bench_database"]:
            self._benchmark(**options)
            return
        argv = options_argv(
            options,
            (
                "sizes",
                "queries",
                "code_bits",
                "fc7_dim",
                "backends",
                "seed",
                "out",
                "min_candidates",
                "coarse_only_sizes",
            ),  # fmt: skip
        )
        run_inside_bench_database(
            command="bench_search", database=BENCH_DATABASE, argv=argv, keep=options["keep_database"]
        )

    # -- inside the bench database ----------------------------------------------------------------------------------
    def _benchmark(self, *, sizes: str, queries: int, code_bits: int, fc7_dim: int, backends: str, seed: int,
                   out: Path, min_candidates: str, coarse_only_sizes: str, **_) -> None:  # fmt: skip
        from catalog import hamming, search
        from catalog.models import Merchant, ModelVersion

        refuse_outside_bench_database(BENCH_DATABASE)
        call_command("migrate", interactive=False, verbosity=0)
        _relax_table_defaults()
        size_list = sorted(int(s) for s in sizes.split(",") if s.strip())  # none: only the codes-only sizes
        data = (
            SyntheticCatalog.make(size=size_list[-1], code_bits=code_bits, fc7_dim=fc7_dim, seed=seed)
            if size_list
            else None
        )
        merchant = Merchant.objects.create(name="Bench", slug="bench")
        version = ModelVersion.objects.create(
            name="bench", code_bits=code_bits, fc7_dim=fc7_dim, status=ModelVersion.Status.ACTIVE
        )
        report: dict = {
            "config": {
                "code_bits": code_bits, "fc7_dim": fc7_dim, "queries": queries, "cluster_size": CLUSTER_SIZE,
                "cluster_spread": CLUSTER_SPREAD, "query_noise": QUERY_NOISE, "code_noise": CODE_NOISE,
                "coarse_min_candidates": search.COARSE_MIN_CANDIDATES,
                "coarse_max_candidates": search.COARSE_MAX_CANDIDATES, "cpus": os.cpu_count(),
            },
            "sizes": [],
        }  # fmt: skip
        loaded = 0
        for size in size_list:
            _drop_hnsw(version)  # inserting into a live HNSW graph row by row is far slower than building it afterwards
            started = time.perf_counter()
            assert data is not None
            _copy_rows(data=data, start=loaded, stop=size, merchant_id=merchant.pk, version_id=version.pk)
            load_s = time.perf_counter() - started
            loaded = size
            started = time.perf_counter()
            index_name = code_index_name(version_id=version.pk)
            if "sql" in backends.split(","):  # only the SQL backend reads the graph; building it at 1M takes minutes
                _rebuild_hnsw(version)
            index_s = time.perf_counter() - started
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE catalog_imageembedding; ANALYZE catalog_product")
                cursor.execute("SELECT coalesce(pg_relation_size(to_regclass(%s)), 0), "
                               "pg_total_relation_size('catalog_imageembedding')", [index_name])  # fmt: skip
                hnsw_bytes, table_bytes = cursor.fetchone()
            query_set = data.queries(count=queries + WARMUP_QUERIES, size=size, seed=seed + size)
            entry: dict = {
                "products": size, "copy_s": round(load_s, 2), "hnsw_build_s": round(index_s, 2),
                "hnsw_index_mb": round(hnsw_bytes / 1e6, 1), "embedding_table_mb": round(table_bytes / 1e6, 1),
                "backends": {},
            }  # fmt: skip
            sweep = [int(m) for m in min_candidates.split(",") if m.strip()] or [search.COARSE_MIN_CANDIDATES]
            for backend, minimum in [(b, m) for b in backends.split(",") for m in sweep]:
                search.COARSE_MIN_CANDIDATES = minimum
                rss_before = _rss_mb()
                started = time.perf_counter()
                if backend == "memory":
                    hamming.MEMORY_INDEX.refresh(version_id=version.pk, code_bits=code_bits, force=True)
                entry_backend: dict = {"load_s": round(time.perf_counter() - started, 2), "min_candidates": minimum}
                entry_backend.update(_measure(version=version, backend=backend, query_set=query_set))
                if backend == "memory":
                    depth = search.candidate_depth(k=TOP_K)
                    entry_backend["coarse_floor"] = _coarse_floor(
                        index=hamming.MEMORY_INDEX, query_set=query_set, depth=depth
                    )
                    entry_backend["fine_floor"] = _fine_floor(
                        index=hamming.MEMORY_INDEX, version=version, query_set=query_set, depth=depth
                    )
                    entry_backend["memory_mb"] = round(hamming.MEMORY_INDEX.stats().memory_bytes / 1e6, 1)
                else:
                    entry_backend["memory_mb"] = round(hnsw_bytes / 1e6, 1)  # what it needs cached: the graph
                entry_backend["process_rss_growth_mb"] = round(_rss_mb() - rss_before, 1)
                key = backend if len(sweep) == 1 else f"{backend}@{minimum}"
                entry["backends"][key] = entry_backend
                self._print(size, key, entry_backend)
            report["sizes"].append(entry)
            hamming.MEMORY_INDEX.clear()
        del data  # (the largest catalog above: room for the codes-only sizes)
        for size in sorted(int(s) for s in coarse_only_sizes.split(",") if s.strip()):
            entry = _coarse_only(size=size, code_bits=code_bits, fc7_dim=fc7_dim, seed=seed, queries=queries)
            report["sizes"].append(entry)
            floor = entry["backends"]["memory"]["coarse_floor"]
            self.stdout.write(
                f"{size:>9,} memory     (codes only) read codes once {floor['read_codes_once_ms']:.2f} ms | "
                f"selection {floor['selection_ms']:.2f} ({floor['selection_to_floor']:.2f}x floor, "
                f"{floor['selection_to_faiss']:.2f}x faiss) | full scan + histogram {floor['full_scan_ms']:.2f} | "
                f"faiss {floor['faiss_flat_ms']:.2f} | {entry['backends']['memory']['memory_mb']} MB"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        self.stdout.write(f"written {out}")

    def _print(self, size: int, backend: str, row: dict) -> None:
        if "coarse_floor" in row:
            floor = row["coarse_floor"]
            self.stdout.write(
                f"{size:>9,} {backend:<10} one core: read codes once {floor['read_codes_once_ms']:.2f} ms | "
                f"selection {floor['selection_ms']:.2f} ({floor['selection_to_floor']:.2f}x floor, "
                f"{floor['selection_to_faiss']:.2f}x faiss) | full scan + histogram {floor['full_scan_ms']:.2f} | "
                f"faiss IndexBinaryFlat top-{FAISS_K} {floor['faiss_flat_ms']:.2f}"
            )
        if "fine_floor" in row:
            fine = row["fine_floor"]
            self.stdout.write(
                f"{size:>9,} {backend:<10} fine {fine['fine_ms']:.3f} ms ({fine['fine_to_floor']:.2f}x the in-memory "
                f"floor {fine['floor_in_memory_ms']:.3f}; its fc7 ranking {fine['fc7_rank_ms']:.3f}; cards read "
                f"{fine['fine_cards_read_ms']:.2f}) | in PostgreSQL {fine['fine_in_postgresql_ms']:.2f} | change-log "
                f"poll {fine['change_log_poll_ms']:.2f} | {fine['candidates_mean']:.0f} candidates, "
                f"{fine['fc7_bytes_per_query'] / 1024:.0f} KiB of fc7"
            )
            self.stdout.write(
                f"{size:>9,} {backend:<10} fine, {FINE_FLOOR_CANDIDATES:,} candidates, k {fine['fine_1000_k']}: "
                f"{fine['fine_1000_ms']:.3f} ms ({fine['fine_1000_to_floor']:.2f}x the in-memory floor "
                f"{fine['floor_1000_ms']:.3f}) | cards read {fine['fine_1000_cards_read_ms']:.2f} ms "
                f"({fine['card_bytes_read']:,} bytes) | {fine['fc7_bytes_1000'] / 1024:.0f} KiB of fc7"
            )
        self.stdout.write(
            f"{size:>9,} {backend:<10} coarse p50 {row['coarse_ms']['p50']:7.2f} p99 {row['coarse_ms']['p99']:7.2f} | "
            f"fine p50 {row['fine_ms']['p50']:6.2f} p99 {row['fine_ms']['p99']:6.2f} | "
            f"total p50 {row['total_ms']['p50']:7.2f} p99 {row['total_ms']['p99']:7.2f} ms | "
            f"recall@10 {row['recall_at_10']:.3f} | candidates {row['candidates_mean']:.0f} | "
            f"memory {row['memory_mb']} MB"
        )
        self.stdout.flush()


@dataclass(frozen=True)
class QuerySet:
    fc7: np.ndarray  # (Q, D)
    bits: np.ndarray  # (Q, B) bool
    truth: np.ndarray  # (Q, 10) product ids of the exact fc7 top 10


@dataclass(frozen=True)
class SyntheticCatalog:
    fc7: np.ndarray  # (N, D) float32, unit length
    bits: np.ndarray  # (N, B) bool
    projection: np.ndarray  # (D, B): the "hash layer"
    seed: int

    @classmethod
    def make(cls, *, size: int, code_bits: int, fc7_dim: int, seed: int) -> SyntheticCatalog:
        rng = np.random.default_rng(seed)
        clusters = -(-size // CLUSTER_SIZE)
        centres = rng.standard_normal((clusters, fc7_dim)).astype(np.float32)
        members = np.arange(size) // CLUSTER_SIZE  # contiguous: every prefix (10k of the 1M) keeps whole clusters
        fc7 = centres[members] + CLUSTER_SPREAD * rng.standard_normal((size, fc7_dim)).astype(np.float32)
        fc7 /= np.linalg.norm(fc7, axis=1, keepdims=True)
        projection = rng.standard_normal((fc7_dim, code_bits)).astype(np.float32)
        return cls(fc7=fc7, bits=_hash(fc7, projection, rng), projection=projection, seed=seed)

    def queries(self, *, count: int, size: int, seed: int) -> QuerySet:
        rng = np.random.default_rng(seed)
        targets = rng.integers(0, size, count)
        noise = rng.standard_normal((count, self.fc7.shape[1])).astype(np.float32)
        fc7 = self.fc7[targets] + QUERY_NOISE * noise / np.sqrt(self.fc7.shape[1])  # a step of length ~QUERY_NOISE
        fc7 /= np.linalg.norm(fc7, axis=1, keepdims=True)
        catalog = self.fc7[:size]
        truth = np.empty((count, TOP_K), np.int64)
        for start in range(0, count, 32):  # exact L2 on unit vectors = largest dot product
            scores = fc7[start : start + 32] @ catalog.T
            top = np.argpartition(-scores, TOP_K, axis=1)[:, :TOP_K]
            truth[start : start + 32] = top + 1  # product ids are row + 1
        return QuerySet(fc7=fc7, bits=_hash(fc7, self.projection, rng), truth=truth)


def _hash(fc7: np.ndarray, projection: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    activations = fc7 @ projection
    scale = activations.std()
    return (activations + CODE_NOISE * scale * rng.standard_normal(activations.shape).astype(np.float32)) > 0


def _measure(*, version, backend: str, query_set: QuerySet) -> dict:
    from catalog import search

    timings: dict[str, list[float]] = {"coarse": [], "fine": [], "total": []}
    recalls, candidates = [], []
    for index in range(len(query_set.fc7)):
        encoding = search.QueryEncoding(
            model_version_id=version.pk, code=np.packbits(query_set.bits[index]), fc7=query_set.fc7[index]
        )
        options = search.SearchOptions(k=TOP_K, backend=backend, category_mode="off")
        started = time.perf_counter()
        result = search.search_encoding(encoding=encoding, version=version, options=options)
        total_ms = (time.perf_counter() - started) * 1000
        if index < WARMUP_QUERIES:
            continue
        timings["coarse"].append(result.timings_ms["coarse"])
        timings["fine"].append(result.timings_ms["fine"])
        timings["total"].append(total_ms)
        found = {hit.product.pk for hit in result.hits}
        recalls.append(len(found & set(query_set.truth[index].tolist())) / TOP_K)
        candidates.append(result.coarse.candidates)
    return {
        **{
            f"{stage}_ms": {
                "p50": round(float(np.percentile(values, 50)), 3),
                "p99": round(float(np.percentile(values, 99)), 3),
            }
            for stage, values in timings.items()
        },
        "recall_at_10": round(float(np.mean(recalls)), 4),
        "candidates_mean": round(float(np.mean(candidates)), 1),
    }


def _coarse_floor(*, index, query_set: QuerySet, depth) -> dict:
    """The memory backend's selection next to what bounds it, on one core: the time to read the codes once (the
    faster of two numpy reductions over them as uint64), the full distance pass with its histogram (the selection
    before the k-NN pass), and faiss's IndexBinaryFlat asked for its top FAISS_K. The methods take turns on each
    query; each is timed by this thread's CPU clock, so that time the shared machine gives to other processes is
    not counted (the stalls of reading memory are: they are CPU time); medians are reported."""
    import faiss

    from catalog.hamming.candidates import ProductFilter

    rows = index._rows
    codes = np.ascontiguousarray(rows.codes[: rows.size])
    words = codes.view(np.uint64)
    flat = faiss.IndexBinaryFlat(codes.shape[1] * 8)
    flat.add(codes)
    everyone = ProductFilter()
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        timings = _interleaved_ms(
            {
                "sum_codes": lambda q: words.sum(),
                "or_codes": lambda q: np.bitwise_or.reduce(words),
                "selection_ms": lambda q: index.search_loaded(code=q, depth=depth, product_filter=everyone),
                "full_scan_ms": lambda q: index._scan_all(query=q.reshape(1, -1), depth=depth, product_filter=everyone),
                "faiss_flat_ms": lambda q: flat.search(q.reshape(1, -1), FAISS_K),
            },
            [np.packbits(bits) for bits in query_set.bits],
            clock=time.thread_time,
        )
    finally:
        faiss.omp_set_num_threads(threads)
    timings["read_codes_once_ms"] = min(timings.pop("sum_codes"), timings.pop("or_codes"))
    timings = {name: round(value, 3) for name, value in timings.items()}
    timings["selection_to_floor"] = round(timings["selection_ms"] / timings["read_codes_once_ms"], 2)
    timings["selection_to_faiss"] = round(timings["selection_ms"] / timings["faiss_flat_ms"], 2)
    timings["full_scan_to_floor"] = round(timings["full_scan_ms"] / timings["read_codes_once_ms"], 2)
    timings["code_bytes"] = int(codes.nbytes)
    return timings


FINE_FLOOR_CANDIDATES = 1_000  # the fine-stage budget: 1,000 candidates ranked exactly


def _fine_floor(*, index, version, query_set: QuerySet, depth) -> dict:
    """The fine stage for the memory backend's candidates, next to its floor (the same candidates' fc7 gathered from
    rows held in memory, exact L2 and a sort, nothing else) and to pgvector ranking them in PostgreSQL (the fine
    stage before fc7 was held in memory); interleaved like _coarse_floor. Twice: on the candidates a k = 10 search
    takes, and on exactly FINE_FLOOR_CANDIDATES of each query's nearest codes, with the k the served search asks
    of the fine stage (verify on: SEARCH_VERIFY_CANDIDATES). The fine stage with its result cards in this
    process's card cache (a shopper population that comes back to the same products) and with every card read
    from PostgreSQL (the cache emptied first: one query by primary key). Also the change-log poll every search
    makes before its coarse stage."""
    import dataclasses

    from catalog import search
    from catalog.hamming.candidates import CandidateDepth, ProductFilter

    everyone = ProductFilter()
    rows = index._rows
    served_k = max(TOP_K, search.verify_candidates())
    wide = CandidateDepth(min_count=FINE_FLOOR_CANDIDATES, max_count=8 * FINE_FLOOR_CANDIDATES)
    prepared = []
    for bits, fc7 in zip(query_set.bits, query_set.fc7):
        code = np.packbits(bits)
        candidates = index.search_loaded(code=code, depth=depth, product_filter=everyone)
        thousand = index.search_loaded(code=code, depth=wide, product_filter=everyone)
        cut = slice(0, FINE_FLOOR_CANDIDATES)
        thousand = dataclasses.replace(
            thousand, embedding_ids=thousand.embedding_ids[cut], distances=thousand.distances[cut],
            rows=thousand.rows[cut],
        )  # fmt: skip
        prepared.append((candidates, fc7, index._rows_of(candidates.embedding_ids), thousand))

    def floor(candidates, fc7, at) -> None:
        difference = rows.fc7[at] - fc7
        np.argsort(np.einsum("ij,ij->i", difference, difference))

    def fine(candidates, fc7, *, k: int = TOP_K, backend: str = "memory", cold: bool = False) -> None:
        if cold:
            index.cards.clear()
        candidates = dataclasses.replace(candidates, backend=backend)  # "sql": the ranking happens in PostgreSQL
        search.fine_rank(candidates=candidates, version=version, fc7=fc7, product_filter=everyone, k=k)

    timings = _interleaved_ms(
        {
            "floor_in_memory_ms": lambda item: floor(item[0], item[1], item[2]),
            "fc7_rank_ms": lambda item: index.fc7_rank(
                version_id=version.pk, embedding_ids=item[0].embedding_ids, fc7=item[1], rows_hint=item[0].rows
            ),  # fmt: skip
            "fine_cards_read_ms": lambda item: fine(item[0], item[1], cold=True),
            "fine_ms": lambda item: fine(item[0], item[1]),  # (the cards the call before read are cached now)
            "fine_in_postgresql_ms": lambda item: fine(item[0], item[1], backend="sql"),
            "floor_1000_ms": lambda item: floor(item[3], item[1], item[3].rows),
            "fine_1000_cards_read_ms": lambda item: fine(item[3], item[1], k=served_k, cold=True),
            "fine_1000_ms": lambda item: fine(item[3], item[1], k=served_k),
            "change_log_poll_ms": lambda item: index._replay_changes(),
        },
        prepared,
    )
    timings = {name: round(value, 3) for name, value in timings.items()}
    timings["fine_to_floor"] = round(timings["fine_ms"] / timings["floor_in_memory_ms"], 2)
    timings["fc7_rank_to_floor"] = round(timings["fc7_rank_ms"] / timings["floor_in_memory_ms"], 2)
    timings["fine_1000_to_floor"] = round(timings["fine_1000_ms"] / timings["floor_1000_ms"], 2)
    timings["fine_1000_k"] = served_k
    timings["candidates_mean"] = round(float(np.mean([len(item[0]) for item in prepared])), 1)
    timings["fc7_bytes_per_query"] = int(timings["candidates_mean"] * rows.fc7.shape[1] * 4)
    timings["fc7_bytes_1000"] = FINE_FLOOR_CANDIDATES * rows.fc7.shape[1] * 4
    timings["card_bytes_read"] = _card_bytes(version=version, embedding_ids=prepared[0][3].embedding_ids[:served_k])
    return timings


def _card_bytes(*, version, embedding_ids: np.ndarray) -> int:
    """What a cold fine stage reads from PostgreSQL for its k cards: the byte size of the rows its query returns."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(sum(pg_column_size(i.file) + pg_column_size(e.landmarks) + pg_column_size(m.slug)"
            " + pg_column_size(p.sku) + pg_column_size(p.title) + pg_column_size(p.category)"
            " + pg_column_size(p.attributes) + coalesce(pg_column_size(p.price), 0) + pg_column_size(p.url) + 40), 0)"
            " FROM catalog_imageembedding e JOIN catalog_productimage i ON i.id = e.image_id"
            " JOIN catalog_product p ON p.id = e.product_id JOIN catalog_merchant m ON m.id = p.merchant_id"
            " WHERE e.id = ANY(%s)",
            [embedding_ids.tolist()],
        )
        return int(cursor.fetchone()[0])


def _interleaved_ms(methods: dict, items: list, clock=time.perf_counter) -> dict[str, float]:
    """Median time (ms, by `clock`: wall time unless told) of each method over the items; on each item every method
    runs once, in turn, after a few unmeasured warm-up items."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    for position, item in enumerate(items):
        for name, run in methods.items():
            started = clock()
            run(item)
            if position >= WARMUP_QUERIES:
                times[name].append(clock() - started)
    return {name: float(np.median(values)) * 1000 for name, values in times.items()}


def _coarse_only(*, size: int, code_bits: int, fc7_dim: int, seed: int, queries: int) -> dict:
    """The memory backend's selection at a size PostgreSQL here cannot hold: synthetic codes made the same way
    (clusters, a random projection, noise), a chunk at a time so that fc7 never exists whole, put straight into a
    MemoryCodeIndex; queries are catalog codes with QUERY_BIT_FLIPS of their bits flipped."""
    from catalog.hamming.memory import MemoryCodeIndex, _Rows

    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((fc7_dim, code_bits)).astype(np.float32)
    rows = _Rows(code_bytes=code_bits // 8)
    rows.reserve(size)
    started = time.perf_counter()
    for start in range(0, size, COARSE_ONLY_CHUNK):
        stop = min(size, start + COARSE_ONLY_CHUNK)
        chunk_rng = np.random.default_rng([seed, start])
        centres = chunk_rng.standard_normal((-(-(stop - start) // CLUSTER_SIZE), fc7_dim)).astype(np.float32)
        fc7 = centres[np.arange(stop - start) // CLUSTER_SIZE]
        fc7 += CLUSTER_SPREAD * chunk_rng.standard_normal(fc7.shape).astype(np.float32)
        fc7 /= np.linalg.norm(fc7, axis=1, keepdims=True)
        rows.codes[start:stop] = np.packbits(_hash(fc7, projection, chunk_rng), axis=1)
    made_s = time.perf_counter() - started
    rows.size = size
    rows.embedding_ids[:size] = rows.product_ids[:size] = np.arange(1, size + 1)
    rows.merchant_ids[:size] = 1
    rows.alive[:size] = True
    index = MemoryCodeIndex()
    index._rows, index._version_id, index._code_bits = rows, 0, code_bits
    index._index_rows()
    targets = rng.integers(0, size, queries + WARMUP_QUERIES)
    bits = np.unpackbits(rows.codes[targets], axis=1).astype(bool)
    bits ^= rng.random(bits.shape) < QUERY_BIT_FLIPS
    query_set = QuerySet(fc7=np.zeros((len(bits), 0), np.float32), bits=bits, truth=np.zeros((len(bits), 0)))
    from catalog import search

    floor = _coarse_floor(index=index, query_set=query_set, depth=search.candidate_depth(k=TOP_K))
    return {
        "products": size,
        "coarse_only": True,
        "synthetic_codes_s": round(made_s, 1),
        "backends": {"memory": {"coarse_floor": floor, "memory_mb": round(index.stats().memory_bytes / 1e6, 1)}},
    }


# --- bulk loading ----------------------------------------------------------------------------------------------------
def _relax_table_defaults() -> None:
    """Give every NOT NULL column without a default one (bench database only), so COPY can name just a few."""
    defaults = {"character varying": "''", "text": "''", "jsonb": "'[]'", "timestamp with time zone": "now()",
                "boolean": "true", "integer": "0", "smallint": "0", "bigint": "0"}  # fmt: skip
    with connection.cursor() as cursor:
        for table in ("catalog_product", "catalog_productimage", "catalog_imageembedding"):
            cursor.execute(
                "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s "
                "AND is_nullable = 'NO' AND column_default IS NULL AND column_name <> 'id'",
                [table],
            )
            for column, data_type in cursor.fetchall():
                if data_type in defaults:
                    cursor.execute(f'ALTER TABLE {table} ALTER COLUMN "{column}" SET DEFAULT {defaults[data_type]}')


def _copy_rows(*, data: SyntheticCatalog, start: int, stop: int, merchant_id: int, version_id: int) -> None:
    """Products, images and embeddings [start, stop) with ids row + 1, by COPY; triggers and FK checks are off
    (session_replication_role) because the bench database has no reader to notify and the ids are consistent."""
    raw = connection.connection
    with connection.cursor() as cursor:
        cursor.execute("SET session_replication_role = replica")
    for chunk in range(start, stop, COPY_CHUNK):
        end = min(stop, chunk + COPY_CHUNK)
        ids = np.arange(chunk + 1, end + 1)
        products = "".join(f"{i}\t{merchant_id}\tB-{i}\tBench product {i}\t{10 + i % 90}.99\n" for i in ids.tolist())
        images = "".join(f"{i}\t{i}\tbench/{i}.png\t{i:064x}\tembedded\t128\t128\n" for i in ids.tolist())
        with raw.cursor() as cursor:
            with cursor.copy("COPY catalog_product (id, merchant_id, sku, title, price) FROM STDIN") as copy:
                copy.write(products)
            with cursor.copy(
                "COPY catalog_productimage (id, product_id, file, sha256, status, width, height) FROM STDIN"
            ) as copy:
                copy.write(images)
            with cursor.copy(
                "COPY catalog_imageembedding (id, image_id, product_id, model_version_id, code, fc7) "
                "FROM STDIN (FORMAT BINARY)"
            ) as copy:
                copy.write(_embedding_copy_payload(ids=ids, data=data, version_id=version_id))
    with connection.cursor() as cursor:
        cursor.execute("SET session_replication_role = origin")
        for table in ("catalog_product", "catalog_productimage", "catalog_imageembedding"):
            cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")


def _embedding_copy_payload(*, ids: np.ndarray, data: SyntheticCatalog, version_id: int) -> bytes:
    """PostgreSQL binary COPY rows: int8 x4, varbit (bit length + bytes), pgvector (dim, unused, float4s)."""
    rows = ids - 1
    code_bits = data.bits.shape[1]
    code_bytes = code_bits // 8
    dim = data.fc7.shape[1]
    row_type = np.dtype(
        [
            ("fields", ">i2"),
            ("id_len", ">i4"), ("id", ">i8"),
            ("image_len", ">i4"), ("image", ">i8"),
            ("product_len", ">i4"), ("product", ">i8"),
            ("version_len", ">i4"), ("version", ">i8"),
            ("code_len", ">i4"), ("code_bits", ">i4"), ("code", np.uint8, (code_bytes,)),
            ("fc7_len", ">i4"), ("fc7_dim", ">i2"), ("fc7_unused", ">i2"), ("fc7", ">f4", (dim,)),
        ]
    )  # fmt: skip
    table = np.zeros(len(ids), row_type)
    table["fields"] = 6
    for name in ("id", "image", "product", "version"):
        table[f"{name}_len"] = 8
    table["id"] = table["image"] = table["product"] = ids
    table["version"] = version_id
    table["code_len"], table["code_bits"] = 4 + code_bytes, code_bits
    table["code"] = np.packbits(data.bits[rows], axis=1)
    table["fc7_len"], table["fc7_dim"] = 4 + 4 * dim, dim
    table["fc7"] = data.fc7[rows]
    header = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
    return header + table.tobytes() + (-1).to_bytes(2, "big", signed=True)


def _drop_hnsw(version) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP INDEX IF EXISTS {code_index_name(version_id=version.pk)}")


def _rebuild_hnsw(version) -> str:
    from catalog.services import model_versions

    name = code_index_name(version_id=version.pk)
    _drop_hnsw(version)
    with connection.cursor() as cursor:
        cursor.execute("SET maintenance_work_mem = '2GB'")
        cursor.execute(f"SET max_parallel_maintenance_workers = {max(1, (os.cpu_count() or 2) - 1)}")
    model_versions.code_index_ensure(version=version)
    return name


def _rss_mb() -> float:
    """Current resident memory of this process (Linux), falling back to the peak elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
