"""`manage.py demo`: the README's first command ends here. Migrates, makes an admin, starts a real Celery worker,
loads the sample catalog (when the sample-shop command is available) and serves the shop."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command, get_commands
from django.core.management.base import BaseCommand

from catalog import query_encoder
from shop_search import embedded

# Two workers, as in deploy/: shoppers' queries get their own process, so loading or importing a catalog (CPU-bound,
# one process per core) never delays a search.
SEARCH_QUEUES = "search"
SEARCH_CONCURRENCY = 1
WORKER_QUEUES = "embed,train"
WORKER_CONCURRENCY = max(1, min(os.cpu_count() or 1, 4))


class Command(BaseCommand):
    help = "Run the demo shop: database, worker, sample catalog and web server on the embedded defaults."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--addrport", default=os.environ.get("DEMO_ADDRPORT", "127.0.0.1:8000"))
        parser.add_argument("--no-catalog", action="store_true", help="skip loading the sample catalog")
        parser.add_argument("--products", type=int, default=int(os.environ.get("DEMO_PRODUCTS", "1000")))

    def handle(self, *args, addrport: str, no_catalog: bool, products: int, **options) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        password = self._admin_password()
        workers = self._start_workers()
        # SIGTERM (not only Ctrl-C) must also stop the worker: turn it into the SystemExit `finally` handles.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            if not no_catalog and "demo_catalog" in get_commands():
                call_command("demo_catalog", products=products)
            # runserver serves from this process: load the active version's query encoder before the first shopper
            query_encoder.warm_up()
            host = addrport if ":" in addrport else f"127.0.0.1:{addrport}"
            self.stdout.write(self.style.SUCCESS("\nshop_search demo is up"))
            self.stdout.write(f"  shop:    http://{host}/")
            self.stdout.write(f"  API:     http://{host}/api/docs/")
            self.stdout.write(f"  admin:   http://{host}/admin/  (user 'admin', password '{password}')")
            self.stdout.write(f"  health:  http://{host}/healthz")
            for worker, queues in zip(workers, (SEARCH_QUEUES, WORKER_QUEUES), strict=True):
                self.stdout.write(f"  worker:  pid {worker.pid}, queues {queues}")
            self.stdout.write(f"  redis:   {settings.REDIS_URL}")
            self.stdout.write("  Ctrl-C stops the web and the workers; `manage.py embedded stop` the databases.\n")
            call_command("runserver", addrport, use_reloader=False)
        finally:
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.wait(timeout=30)

    def _admin_password(self) -> str:
        """A random admin password made once per checkout (kept in var/, shown at every start)."""
        password_file = embedded.VAR_DIR / "demo-admin-password"
        if not password_file.exists():
            password_file.write_text(secrets.token_urlsafe(12))
        password = password_file.read_text().strip()
        user, _ = get_user_model().objects.get_or_create(
            username="admin", defaults={"is_staff": True, "is_superuser": True, "email": "admin@example.com"}
        )
        user.set_password(password)
        user.save()
        return password

    def _start_workers(self) -> list[subprocess.Popen]:
        """The search worker, then the worker for embedding, imports and training."""
        return [
            subprocess.Popen(command, cwd=settings.BASE_DIR, env=os.environ.copy()) for command in worker_commands()
        ]


def worker_commands() -> list[list[str]]:
    def worker(queues: str, concurrency: int, name: str) -> list[str]:
        return [
            sys.executable, "-m", "celery", "-A", "shop_search", "worker",
            "-Q", queues, "--concurrency", str(concurrency), "--loglevel", "WARNING", "-n", f"{name}@%h",
        ]  # fmt: skip

    return [worker(SEARCH_QUEUES, SEARCH_CONCURRENCY, "demo-search"), worker(WORKER_QUEUES, WORKER_CONCURRENCY, "demo")]
