"""Settings for the test suite: the real settings, with a test environment set before they are read.

Real services (embedded PostgreSQL + pgvector, real Redis) and production-like settings (DEBUG off), but over
plain HTTP, and on Redis database 15 so that a demo shop running on the same machine never consumes the tests'
Celery tasks. Worker processes started by tests use this module too.
"""

import os
import secrets

from shop_search import embedded

os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(50))
os.environ.setdefault("SECURE_SSL_REDIRECT", "0")
os.environ.setdefault("REDIS_URL", embedded.redis_url(db=15))
os.environ.setdefault("CACHE_KEY_PREFIX", "shop_search_test")

from shop_search.settings import *  # noqa: E402,F403

MEDIA_ROOT = VAR_DIR / "test-media"  # noqa: F405
PRIVATE_MEDIA_ROOT = VAR_DIR / "test-private"  # noqa: F405
