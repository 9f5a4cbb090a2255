"""gunicorn settings for the web process (no torch here: the network runs in Celery workers)."""

import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))  # a search waits on the worker: threads keep slots free
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
accesslog = "-"
