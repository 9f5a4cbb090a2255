"""Settings from the environment, production hardening, and the API shell endpoints."""

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_manage(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DJANGO_SETTINGS_MODULE", "SECRET_KEY", "DEBUG", "SECURE_SSL_REDIRECT"}
    }
    environment.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_production_settings_pass_the_deploy_check():
    result = run_manage(
        "check", "--deploy", "--fail-level", "WARNING",
        SECRET_KEY=secrets.token_urlsafe(50), DEBUG="0", ALLOWED_HOSTS="shop.example.com",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_production_has_no_default_secret():
    result = run_manage("check", DEBUG="0", ALLOWED_HOSTS="shop.example.com")
    assert result.returncode != 0
    assert "SECRET_KEY must be set" in result.stderr


@pytest.mark.django_db
def test_healthz_for_anonymous_callers_is_cheap_and_quiet(client, monkeypatch):
    from shop_search.celery import app as celery_app

    def no_broadcast(*args, **kwargs):
        raise AssertionError("an anonymous /healthz must not broadcast a Celery ping")

    monkeypatch.setattr(celery_app.control, "ping", no_broadcast)
    started = time.perf_counter()
    response = client.get("/healthz")
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": {"ok": True}, "redis": {"ok": True}}}
    assert elapsed < 0.5, elapsed  # was ~1 s: the ping broadcast waited out its timeout


@pytest.mark.django_db
def test_healthz_for_staff_reports_database_pgvector_redis_and_workers(client, django_user_model):
    staff = django_user_model.objects.create_user("health-staff", password="pw", is_staff=True)
    client.force_login(staff)
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["checks"]["database"]["ok"] and body["checks"]["database"]["pgvector"]
    assert body["checks"]["redis"]["ok"]
    assert {"count", "names"} <= set(body["checks"]["workers"])
    assert body["status"] in {"ok", "degraded"}


@pytest.mark.django_db
def test_openapi_schema_and_swagger_ui_are_served(client):
    schema = client.get("/api/schema/")
    assert schema.status_code == 200
    assert b"openapi" in schema.content
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    assert b"swagger" in docs.content.lower()


@pytest.mark.django_db
def test_admin_login_page_is_served(client):
    assert client.get("/admin/login/").status_code == 200


def test_throttle_identity_ignores_a_spoofed_forwarded_for_header(rf):
    from rest_framework.request import Request

    from catalog.api.search import SearchRateThrottle

    request = Request(rf.get("/api/search", HTTP_X_FORWARDED_FOR="203.0.113.9", REMOTE_ADDR="198.51.100.7"))
    assert SearchRateThrottle().get_ident(request) == "198.51.100.7"
