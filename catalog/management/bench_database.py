"""Benchmarks that load catalogs run in a throwaway database on the same server, never in the shop's.

A benchmark command calls `run_inside_bench_database` from its `handle`: the database is created, the same command
runs again in a child process with `INNER_FLAG` and `DATABASE_URL` pointing there (so every connection the child
opens, Django's and the worker pipelines', lands in it), and the database is dropped afterwards unless kept. The
child calls `refuse_outside_bench_database` before it writes anything. A benchmark that stores files or queues tasks
passes `redis_db`: the child then also gets a media and models folder of its own and that Redis database, removed or
left alone afterwards with the database.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.core.management.base import CommandError
from django.db import connection

INNER_FLAG = "--inside-bench-database"
INNER_HELP = "(internal) run inside the bench database"


def url_with_path(url: str, path: str) -> str:
    """A database or Redis URL with another path: another database name, another Redis db number."""
    return urlunsplit(urlsplit(url)._replace(path=path))


def options_argv(options: dict, names: Sequence[str]) -> list[str]:
    """The command's own options, as the child process's command line (`--sizes 1000 --seeds 0,1,2 ...`)."""
    return [part for name in names for part in (f"--{name.replace('_', '-')}", str(options[name]))]


def run_inside_bench_database(
    *,
    command: str,
    database: str,
    argv: Sequence[str],
    env: dict[str, str] | None = None,
    keep: bool = False,
    inner_flag: bool = True,
    redis_db: int | None = None,
) -> None:
    """Run `manage.py command INNER_FLAG *argv` in a fresh `database`, then drop it (unless `keep`). Without
    `inner_flag` the command is one that knows nothing of bench databases (bench_ingest) and runs there as is. With
    `redis_db`, the stored files, checkpoints and the tasks services queue on commit stay away from the shop's too:
    a temporary MEDIA_ROOT and MODELS_DIR (removed afterwards) and that Redis database."""
    if redis_db is None:
        _run_in_database(command=command, database=database, argv=argv, env=env, keep=keep, inner_flag=inner_flag)
        return
    work = Path(tempfile.mkdtemp(prefix=f"{command}-", dir=Path(settings.VAR_DIR)))
    workspace = {
        "REDIS_URL": url_with_path(settings.REDIS_URL, f"/{redis_db}"),
        "MEDIA_ROOT": str(work / "media"),
        "MODELS_DIR": str(work / "models"),
    }
    try:
        _run_in_database(
            command=command, database=database, argv=argv, env={**workspace, **(env or {})}, keep=keep,
            inner_flag=inner_flag,
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_in_database(
    *, command: str, database: str, argv: Sequence[str], env: dict[str, str] | None, keep: bool, inner_flag: bool
) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        cursor.execute(f"CREATE DATABASE {database}")
    child_env = {**os.environ, "DATABASE_URL": url_with_path(settings.DATABASE_URL, f"/{database}"), **(env or {})}
    try:
        done = subprocess.run(
            [
                sys.executable,
                str(Path(settings.BASE_DIR) / "manage.py"),
                command,
                *([INNER_FLAG] if inner_flag else []),
                *argv,
            ],  # fmt: skip
            env=child_env,
            cwd=settings.BASE_DIR,
        )
    finally:
        if not keep:
            connection.close()
            with connection.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    if done.returncode:
        raise CommandError(f"the benchmark failed (exit {done.returncode})")


def refuse_outside_bench_database(database: str) -> None:
    if connection.settings_dict["NAME"] != database:
        raise CommandError(f"refusing to load a benchmark catalog into {connection.settings_dict['NAME']!r}")
