"""`/healthz`: is every real part reachable? 200 when the database (with pgvector) and Redis answer.

Anonymous callers (load balancers, uptime probes) get only that: two cheap queries, no versions, no host names.
Staff (a session) also get the workers: a Celery ping broadcast (up to a second), their count and host names, and
"degraded" (still 200) when none answers, since the web can serve without one."""

from __future__ import annotations

import time
from collections.abc import Callable

from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from shop_search.celery import app as celery_app

WORKER_PING_TIMEOUT_S = 1.0  # a health probe must answer fast even when no worker runs


def _database() -> dict:
    with connection.cursor() as cursor:
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        row = cursor.fetchone()
    return {"ok": True, "pgvector": row[0] if row else None}


def _redis() -> dict:
    cache.set("healthz", "1", timeout=5)
    return {"ok": cache.get("healthz") == "1"}


def _workers() -> dict:
    replies = celery_app.control.ping(timeout=WORKER_PING_TIMEOUT_S) or []
    return {
        "ok": bool(replies),
        "count": len(replies),
        "names": sorted(name for reply in replies for name in reply),
    }


def _check(probe: Callable[[], dict]) -> dict:
    started = time.perf_counter()
    try:
        result = probe()
    except Exception as exc:  # a health check reports failures instead of raising them
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    staff = bool(getattr(request, "user", None) and request.user.is_active and request.user.is_staff)
    checks = {"database": _check(_database), "redis": _check(_redis)}
    pgvector_ok = checks["database"].get("pgvector") is not None
    essential_ok = checks["database"]["ok"] and pgvector_ok and checks["redis"]["ok"]
    if not staff:
        quiet = {
            name: {"ok": bool(check["ok"]) and (name != "database" or pgvector_ok)} for name, check in checks.items()
        }
        return JsonResponse(
            {"status": "ok" if essential_ok else "down", "checks": quiet}, status=200 if essential_ok else 503
        )
    checks["workers"] = _check(_workers)
    status = "ok" if essential_ok and checks["workers"]["ok"] else ("degraded" if essential_ok else "down")
    return JsonResponse({"status": status, "checks": checks}, status=200 if essential_ok else 503)
