"""The embedded defaults start real servers where the machine has none."""

import os

import pytest
import redis

from shop_search import embedded


def test_embedded_redis_starts_answers_and_stops(tmp_path, monkeypatch):
    monkeypatch.setattr(embedded, "VAR_DIR", tmp_path)
    monkeypatch.setattr(embedded, "EMBEDDED_REDIS_PORT", 6391)  # not the demo's port: the demo may be running
    url = embedded.redis_start()
    try:
        assert url == "redis://127.0.0.1:6391"
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert embedded.redis_start() == url  # a second call finds it running
    finally:
        assert embedded.redis_stop()


def test_redis_url_prefers_the_environment(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://example.invalid:1/2")
    assert embedded.redis_url() == "redis://example.invalid:1/2"


def test_embedded_postgres_url_is_a_unix_socket_url_to_the_project_database():
    url = embedded.postgres_url()
    assert url.startswith("postgresql://postgres:@/shop_search?host=")


@pytest.mark.skipif(bool(os.environ.get("DATABASE_URL")), reason="an external database keeps its own settings")
@pytest.mark.django_db
def test_embedded_postgres_runs_with_the_project_settings():
    from django.db import connection

    with connection.cursor() as cursor:
        for name, value in embedded.EMBEDDED_POSTGRES_SETTINGS.items():
            cursor.execute(f"SHOW {name}")
            assert cursor.fetchone()[0] == value
