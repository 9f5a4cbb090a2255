"""`manage.py embedded status|stop`: the embedded PostgreSQL and Redis servers of a checkout."""

from django.conf import settings
from django.core.management.base import BaseCommand

from shop_search import embedded


class Command(BaseCommand):
    help = "Show or stop the embedded PostgreSQL + pgvector and Redis servers of this checkout."

    def add_arguments(self, parser) -> None:
        parser.add_argument("action", choices=["status", "stop"])

    def handle(self, *args, action: str, **options) -> None:
        if action == "status":
            self.stdout.write(
                f"database: {settings.DATABASES['default']['HOST'] or 'tcp'} (embedded data dir {embedded.PGDATA})"
            )
            self.stdout.write(f"redis:    {settings.REDIS_URL}")
            return
        stopped_pg = embedded.postgres_stop()
        stopped_redis = embedded.redis_stop()
        self.stdout.write(f"embedded postgres: {'stopped' if stopped_pg else 'not running'}")
        self.stdout.write(f"embedded redis:    {'stopped' if stopped_redis else 'not running'}")
