"""Work handed to the Celery workers, by task name.

The catalog never imports `workers` (the workers import the catalog): web processes stay free of torch and the
two packages never import each other. A task is named here by the string `workers/tasks.py` registers it under,
with the queue CELERY_TASK_ROUTES (or the task's own `queue=`) gives it; tests/catalog/test_dispatch.py checks
that both still agree.

Writes are queued only once the current transaction commits: a worker must never look for a row that is not
visible yet, or that a rollback took back. The shopper's query encoding is the one call that waits for its answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from celery import current_app
from celery.exceptions import TimeoutError as CeleryTimeout
from django.db import transaction

from catalog import query_payload

EMBED_CHUNK = 64  # images per embed task: big enough to batch the network, small enough to retry cheaply
QUERY_ENCODE_TIMEOUT_S = 30  # the shopper is waiting: the encode task's time limit too (workers/tasks.py)


@dataclass(frozen=True)
class Task:
    name: str  # as registered by workers/tasks.py
    queue: str  # as routed by settings.CELERY_TASK_ROUTES
    # seconds after sending when a worker that only now reaches the task drops it (state REVOKED) unrun
    expires_s: float | None = None


EMBED_IMAGES = Task("workers.tasks.embed_images", "embed")
FINISH_INDEXING = Task("workers.tasks.embed_finish_indexing", "embed")
RUN_IMPORT_CHUNK = Task("workers.tasks.import_run_chunk", "embed")  # ingest feeds embedding: same workers
# An image the merchant API was asked to add by URL: fetched by a worker, never in the web thread.
FETCH_PRODUCT_IMAGE = Task("workers.tasks.product_image_fetch", "embed")
# An import's zip inflated and counted once (never in the upload request), then its chunks queued.
CHECK_IMPORT_ARCHIVE = Task("workers.tasks.import_check_archive", "embed")
FIT_BASELINE = Task("workers.tasks.train_baseline", "train")
TRAIN_NETWORK = Task("workers.tasks.train_network", "train")
# Evaluation embeds the catalog with the version and runs its golden set: network work, off the shoppers' workers.
EVALUATE_VERSION = Task("workers.tasks.evaluate_version", "train")
# Expires when the shopper stops waiting: a backlog of abandoned queries never delays the ones still waited for.
ENCODE_QUERY = Task("workers.tasks.encode_query", "search", expires_s=QUERY_ENCODE_TIMEOUT_S)
# Loads the newly active version's network in a search worker process before a shopper's query has to.
WARM_UP_SEARCH = Task("workers.tasks.warm_up_search", "search")
TASKS = (
    EMBED_IMAGES,
    FINISH_INDEXING,
    RUN_IMPORT_CHUNK,
    CHECK_IMPORT_ARCHIVE,
    FETCH_PRODUCT_IMAGE,
    FIT_BASELINE,
    TRAIN_NETWORK,
    EVALUATE_VERSION,
    ENCODE_QUERY,
    WARM_UP_SEARCH,
)


def _send(task: Task, *args: Any) -> Any:
    options = {} if task.expires_s is None else {"expires": task.expires_s}
    return current_app.send_task(task.name, args=list(args), queue=task.queue, **options)


def _send_after_commit(task: Task, *args: Any) -> None:
    transaction.on_commit(partial(_send, task, *args))


def queue_length(queue: str) -> int:
    """Messages waiting in a broker queue (not those a worker has taken); 0 when the queue was never declared."""
    with current_app.connection_for_write() as connection:
        try:
            return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)
        except Exception:  # noqa: BLE001  (a queue nobody declared yet holds nothing)
            return 0


def embed_images(*, image_ids: Sequence[int]) -> None:
    """Embed these images under every serving version, in tasks of EMBED_CHUNK images."""
    ids = list(image_ids)
    for start in range(0, len(ids), EMBED_CHUNK):
        _send_after_commit(EMBED_IMAGES, ids[start : start + EMBED_CHUNK])


def finish_indexing(*, version_id: int) -> None:
    """Activate an indexing version once every image has its embedding (the task polls until then)."""
    _send_after_commit(FINISH_INDEXING, version_id)


def run_import_chunk(*, chunk_id: int) -> None:
    _send_after_commit(RUN_IMPORT_CHUNK, chunk_id)


def fetch_product_image(*, fetch_id: int) -> None:
    _send_after_commit(FETCH_PRODUCT_IMAGE, fetch_id)


def check_import_archive(*, job_id: int) -> None:
    """Inflate an import's zip under the caps; its chunks are queued once it passes (the job fails if not)."""
    _send_after_commit(CHECK_IMPORT_ARCHIVE, job_id)


def fit_baseline(*, version_id: int) -> None:
    """Fit version 0 on the catalog, then index the catalog with it."""
    _send_after_commit(FIT_BASELINE, version_id)


def train_network(*, training_run_id: int) -> None:
    _send_after_commit(TRAIN_NETWORK, training_run_id)


def warm_up_search() -> None:
    """Once a version is active, have a search worker process load its network now (a worker preloads the active
    version when it starts; one started before this version existed would otherwise load it on a shopper's query)."""
    _send_after_commit(WARM_UP_SEARCH)


def evaluate_version(*, version_id: int) -> None:
    """Evaluate a version on the golden set (workers.pipelines.version_evaluate_golden); the numbers land on it."""
    _send_after_commit(EVALUATE_VERSION, version_id)


def encode_query(
    *, photo: bytes, version_id: int, keypoints: bool = False, item_weight: float = 0.0
) -> query_payload.QueryEncoding:
    """Encode a validated query photo in a worker on the `search` queue and wait for it (the shopper is waiting);
    with `keypoints`, the worker also returns the photo's local features (geometric verification); with
    `item_weight`, the encoding mixes in the photo's best item box (inference.localise.encode_with_item).

    Raises TimeoutError when no worker answered within QUERY_ENCODE_TIMEOUT_S."""
    result = _send(ENCODE_QUERY, query_payload.photo_to_message(photo), version_id, keypoints, item_weight)
    try:
        message = result.get(timeout=QUERY_ENCODE_TIMEOUT_S)
    except CeleryTimeout as exc:
        raise TimeoutError(f"the search worker did not answer within {QUERY_ENCODE_TIMEOUT_S} s") from exc
    return query_payload.encoding_from_message(message)
