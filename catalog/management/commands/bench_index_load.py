"""`manage.py bench_index_load`: how long a web process takes to load the memory index, and what it then holds.

In a throwaway database (`bench_search`'s synthetic catalog, loaded by binary COPY), for each size: a fresh process
(what a restarted web process is) loads the active version into `catalog.hamming.MEMORY_INDEX` with fc7 beside the
codes (SEARCH_FC7_IN_MEMORY), `--repeats` times; reported are the median load time, the index's arrays, the
process's resident memory after the load (what each web process keeps) and its peak during it (VmHWM), next to the
same process's memory before the load (Django, numpy, faiss). Three ways: from PostgreSQL with snapshots off (the
binary COPY), the first process with snapshots on (the COPY, then the snapshot file written by a thread of its own
after the load returned: both times are reported), and the processes after it (the snapshot read, then the change
log replayed). Each load is checked against SQL: the row count, and the first 2,000 embeddings' id, product,
merchant, code and fc7 as `SELECT` returns them. Those later processes then time a search's refresh twice: a plain
poll of the change log, and one that finds the snapshot due for its periodic rewrite (what that search waits for,
and how long the write then takes beside it), then poll again and again until that write ends (the slowest of
those polls: what the searches beside the write wait for).

    DEBUG=1 .venv/bin/python manage.py bench_index_load --sizes 100000,1000000
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from catalog.hamming import snapshot
from catalog.management.bench_database import (
    INNER_FLAG,
    INNER_HELP,
    options_argv,
    refuse_outside_bench_database,
    run_inside_bench_database,
)

BENCH_DATABASE = "shop_search_bench_index_load"
MEASURE_FLAG = "--measure-one-load"  # (internal) the fresh process that loads once and prints what it measured


class Command(BaseCommand):
    help = "Time a fresh process's load of the memory index (codes + fc7) at each catalog size; memory per process."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--sizes", default="100000,1000000", help="comma-separated catalog sizes")
        parser.add_argument("--code-bits", type=int, default=256)
        parser.add_argument("--fc7-dim", type=int, default=128)
        parser.add_argument("--repeats", type=int, default=3, help="fresh-process loads per size (median reported)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "index_load.json")
        parser.add_argument("--keep-database", action="store_true", help="leave the bench database for inspection")
        parser.add_argument(INNER_FLAG, action="store_true", help=INNER_HELP)
        parser.add_argument(MEASURE_FLAG, action="store_true", help=INNER_HELP)

    def handle(self, *args, **options) -> None:
        if options["measure_one_load"]:
            self.stdout.write(json.dumps(_measure_one_load()))
            return
        if options["inside_bench_database"]:
            self._benchmark(**options)
            return
        argv = options_argv(options, ("sizes", "code_bits", "fc7_dim", "repeats", "seed", "out"))
        run_inside_bench_database(
            command="bench_index_load", database=BENCH_DATABASE, argv=argv, keep=options["keep_database"]
        )

    def _benchmark(self, *, sizes: str, code_bits: int, fc7_dim: int, repeats: int, seed: int, out: Path,
                   **_) -> None:  # fmt: skip

        refuse_outside_bench_database(BENCH_DATABASE)
        # Snapshots go to a folder of the run's own, not the shop's MODELS_DIR (the children are told it).
        settings.MODELS_DIR = Path(tempfile.mkdtemp(prefix="bench_index_load-", dir=settings.VAR_DIR))
        try:
            self._sizes(sizes=sizes, code_bits=code_bits, fc7_dim=fc7_dim, repeats=repeats, seed=seed, out=out)
        finally:
            shutil.rmtree(settings.MODELS_DIR, ignore_errors=True)

    def _sizes(self, *, sizes: str, code_bits: int, fc7_dim: int, repeats: int, seed: int, out: Path) -> None:
        from catalog.management.commands.bench_search import SyntheticCatalog, _copy_rows, _relax_table_defaults
        from catalog.models import Merchant, ModelVersion

        call_command("migrate", interactive=False, verbosity=0)
        _relax_table_defaults()
        size_list = sorted(int(s) for s in sizes.split(","))
        data = SyntheticCatalog.make(size=size_list[-1], code_bits=code_bits, fc7_dim=fc7_dim, seed=seed)
        merchant = Merchant.objects.create(name="Bench", slug="bench")
        version = ModelVersion.objects.create(
            name="bench", code_bits=code_bits, fc7_dim=fc7_dim, status=ModelVersion.Status.ACTIVE
        )
        report: dict = {"config": {"code_bits": code_bits, "fc7_dim": fc7_dim, "repeats": repeats}, "sizes": []}
        loaded = 0
        for size in size_list:
            _copy_rows(data=data, start=loaded, stop=size, merchant_id=merchant.pk, version_id=version.pk)
            loaded = size
            with connection.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE catalog_imageembedding")  # as a settled shop's table is
            # The copy bypassed the triggers: a change row anchors this size's snapshot, and the last size's goes.
            with connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO catalog_indexchange (op, product_id, created_at) VALUES ('product', -1, now())"
                )
            shutil.rmtree(snapshot.directory(), ignore_errors=True)
            sql = [self._fresh_process_load(snapshots=False) for _ in range(repeats)]
            first = self._fresh_process_load(snapshots=True)  # from PostgreSQL, then the snapshot is written
            again = [self._fresh_process_load(snapshots=True) for _ in range(repeats)]
            if first["snapshot_loads"] or not all(run["snapshot_loads"] for run in again):
                raise CommandError("the snapshot was not written, or not read back")
            entry = {
                "products": size,
                "load_s": _median(sql),
                "load_s_runs": [run["load_s"] for run in sql],
                "first_load_s": first["load_s"],  # what the first search waits: the snapshot is written after it
                "load_and_write_snapshot_s": round(first["load_s"] + first["snapshot_write_s"], 2),
                "snapshot_mb": round(sum(f.stat().st_size for f in snapshot.directory().glob("*.index")) / 1e6, 1),
                "snapshot_load_s": _median(again),
                "snapshot_load_s_runs": [run["load_s"] for run in again],
                **{key: sql[-1][key] for key in ("index_mb", "rss_before_mb", "rss_after_mb", "rss_peak_mb")},
                "snapshot_rss_after_mb": again[-1]["rss_after_mb"],
                "snapshot_rss_peak_mb": again[-1]["rss_peak_mb"],
                **{key: round(statistics.median(run[key] for run in again), 3)
                   for key in ("refresh_poll_ms", "refresh_rewriting_snapshot_ms", "snapshot_rewrite_s",
                               "refreshes_during_rewrite", "refresh_during_rewrite_max_ms")},
            }  # fmt: skip
            report["sizes"].append(entry)
            self.stdout.write(json.dumps(entry))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        self.stdout.write(f"written {out}")

    def _fresh_process_load(self, *, snapshots: bool) -> dict:
        env = {**os.environ, "SEARCH_FC7_IN_MEMORY": "1", "SEARCH_INDEX_SNAPSHOTS": "1" if snapshots else "0",
               "MODELS_DIR": str(settings.MODELS_DIR)}  # fmt: skip
        done = subprocess.run(
            [sys.executable, str(Path(settings.BASE_DIR) / "manage.py"), "bench_index_load", MEASURE_FLAG],
            capture_output=True, text=True, cwd=settings.BASE_DIR, env=env,
        )  # fmt: skip
        if done.returncode:
            raise CommandError(f"the load failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def _measure_one_load() -> dict:
    """Load the active version once in this (fresh) process, check it against SQL, report time and memory."""
    from catalog import hamming, selectors

    version = selectors.model_version_active()
    if version is None:
        raise CommandError("no active version")
    connection.ensure_connection()
    rss_before = _status_mb("VmRSS")
    started = time.perf_counter()
    hamming.MEMORY_INDEX.refresh(version_id=version.pk, code_bits=version.code_bits, force=True)
    load_s = time.perf_counter() - started
    hamming.MEMORY_INDEX.wait_snapshot()  # (written after a load from PostgreSQL, beside the searches)
    result = {
        "load_s": round(load_s, 3),
        "snapshot_write_s": round(time.perf_counter() - started - load_s, 3),
        "index_mb": round(hamming.MEMORY_INDEX.stats().memory_bytes / 1e6, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(_status_mb("VmRSS"), 1),
        "rss_peak_mb": round(_status_mb("VmHWM"), 1),
        "snapshot_loads": hamming.MEMORY_INDEX.stats().snapshot_loads,
    }
    _check_against_sql(version)
    if result["snapshot_loads"]:
        result |= _refresh_rewriting_snapshot(version)
    return result


def _refresh_rewriting_snapshot(version, polls: int = 5) -> dict:
    """A search's refresh of the loaded index (no change to replay): the median of `polls` plain polls, then one that
    finds the snapshot on disk due for its periodic rewrite (SNAPSHOT_REFRESH_S), how long that write takes, and
    the polls made meanwhile (how many, the slowest)."""
    from catalog import hamming
    from catalog.hamming import memory

    index = hamming.MEMORY_INDEX
    plain = []
    for _ in range(polls):
        started = time.perf_counter()
        index.refresh(version_id=version.pk, code_bits=version.code_bits, force=True)
        plain.append(time.perf_counter() - started)
    saved = memory.SNAPSHOT_CHECK_S, memory.SNAPSHOT_REFRESH_S
    memory.SNAPSHOT_CHECK_S, memory.SNAPSHOT_REFRESH_S = 0.0, -1  # the file just read is due at once
    try:
        started = time.perf_counter()
        index.refresh(version_id=version.pk, code_bits=version.code_bits, force=True)
        refresh_s = time.perf_counter() - started
    finally:
        memory.SNAPSHOT_CHECK_S, memory.SNAPSHOT_REFRESH_S = saved  # (no other write once this one ends)
    during = []  # searches go on while the file is written: each one's refresh
    while not index.wait_snapshot(timeout=0):
        polled = time.perf_counter()
        index.refresh(version_id=version.pk, code_bits=version.code_bits, force=True)
        during.append(time.perf_counter() - polled)
    written_s = time.perf_counter() - started
    return {
        "refresh_poll_ms": round(statistics.median(plain) * 1e3, 2),
        "refresh_rewriting_snapshot_ms": round(refresh_s * 1e3, 2),
        "snapshot_rewrite_s": round(written_s, 3),
        "refreshes_during_rewrite": len(during),
        "refresh_during_rewrite_max_ms": round(max(during, default=0.0) * 1e3, 2),
    }


def _check_against_sql(version) -> None:
    """The loaded rows equal what SQL holds (ids, products, merchants, codes, fc7), in embedding id order."""
    from catalog import hamming
    from catalog.codes import bitstring_pack, code_sql

    index = hamming.MEMORY_INDEX
    rows = index._rows
    assert rows is not None
    order = np.argsort(rows.embedding_ids[: rows.size])
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT e.id, e.product_id, p.merchant_id, ({code_sql('e.code', version.code_bits)})::text, e.fc7::text "
            "FROM catalog_imageembedding e JOIN catalog_product p ON p.id = e.product_id "
            "WHERE e.model_version_id = %s AND p.active ORDER BY e.id LIMIT 2000",
            [version.pk],
        )
        sample = cursor.fetchall()
        cursor.execute("SELECT count(*) FROM catalog_imageembedding WHERE model_version_id = %s", [version.pk])
        total = cursor.fetchone()[0]
    if total != rows.size:
        raise CommandError(f"loaded {rows.size} rows, SQL holds {total}")
    first = order[: len(sample)]
    for at, (embedding_id, product_id, merchant_id, bits, fc7) in zip(first, sample, strict=True):
        if (
            rows.embedding_ids[at] != embedding_id
            or rows.product_ids[at] != product_id
            or rows.merchant_ids[at] != merchant_id
            or not np.array_equal(rows.codes[at], bitstring_pack(bits))
            or not np.array_equal(rows.fc7[at], np.array(json.loads(fc7), np.float32))
        ):
            raise CommandError(f"embedding {embedding_id} loaded differently from what SQL holds")


def _median(runs: list[dict]) -> float:
    return round(statistics.median(run["load_s"] for run in runs), 2)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")
