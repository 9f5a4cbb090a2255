"""gunicorn settings for the web process (no torch here: the shopper's photo is encoded on ONNX Runtime)."""

import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "4"))  # SEARCH_MAX_CONCURRENT searches, and a thread for the rest
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
accesslog = "-"


def post_worker_init(worker) -> None:
    """Load the active version's query encoder before the first shopper's search has to (catalog.query_encoder)."""
    from catalog import query_encoder

    try:
        query_encoder.warm_up()
    except Exception:  # the database may not be reachable yet: the first search loads it instead
        worker.log.exception("could not preload the query encoder")
