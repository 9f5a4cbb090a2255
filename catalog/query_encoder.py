"""The shopper's photo -> its QueryEncoding, in this web process (SEARCH_ENCODER=inprocess, the default) or in a
worker on the `search` queue (SEARCH_ENCODER=worker).

In process, the active version's ONNX export runs on ONNX Runtime (the torch-free `inference` package, the same
Encoder the workers run), and the photo's SIFT keypoints for the verify stage are extracted here too
(catalog.geometry). `manage.py bench_encode` measured why (README, "Encoding a shopper's photo"): version 0's network
takes most of the in-process encode, while the trip through Celery (payload, broker, prefork pool, result backend)
added more than the network itself. torch never loads in a web process: onnxruntime is not torch.

One encoder per process, for the active version: loaded on the first search (or `warm_up`), with
SEARCH_ENCODER_THREADS intra-op threads (1: concurrent searches, one core each, must not oversubscribe the
machine), and loaded again when a search serves another version (each search passes the version it serves, as the
memory index notices a switch). The export is written beside the checkpoint by the worker that fitted or trained
the version (workers/encoders.py); while a version has no current export (a failed export, or a version registered
from elsewhere that no worker has loaded yet), its queries go to a worker, which encodes with what it has: a slower
search beats none. The folder holding the checkpoints (MODELS_DIR) must be shared with the web processes.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from PIL import Image

from catalog import dispatch, geometry, query_payload, selectors
from catalog.intake.images import image_downscale
from catalog.models import ModelVersion
from inference.encoder import Encoder
from inference.localise import encode_with_item
from inference.onnx_runtime import OnnxNetwork

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "inprocess"  # settings.SEARCH_ENCODER wins (and is checked there: "inprocess" or "worker")
# The photo is downscaled once, before either encoder sees it: the networks here letterbox to 224 px or less and
# geometry works at QUERY_SIDE (256) px, so twice that keeps their own resizing filtering from finer pixels, while
# resizing, SIFT's grey conversion and the JPEG a worker is sent no longer scale with a 12-MP phone photo.
QUERY_MAX_SIDE = 512
EXPORT_RETRY_S = 30.0  # a version without a usable export is looked for again this often (a worker may make it)


class EncoderUnavailable(RuntimeError):
    """No worker answered the query photo in time (the in-process encoder has no such failure)."""


@dataclass(frozen=True)
class EncodedQuery:
    encoding: query_payload.QueryEncoding
    encoder: str  # "inprocess" or "worker": who encoded it
    # encode: preprocessing + network; keypoints (when extracted here): SIFT, which runs alongside encode (overlaps)
    timings_ms: dict[str, float]


def query_image(image: Image.Image) -> Image.Image:
    """A decoded photo scaled down to QUERY_MAX_SIDE (never up), as `intake.image_query` hands the search its photo:
    for callers that already hold a picture (bench_encode, tests)."""
    return image_downscale(image, QUERY_MAX_SIDE)


def query_encode(
    *, image: Image.Image, version: ModelVersion, keypoints: bool = False, item_weight: float = 0.0
) -> EncodedQuery:
    """Encode the (query_image) photo with the version's network, with its item boxes; with `keypoints`, also its
    packed local features; with `item_weight` > 0, the encoding mixes the whole photo with the photo cropped to its
    best item box (inference.localise.encode_with_item: a second pass of the network).

    Raises EncoderUnavailable when the worker path is taken and no worker answered."""
    choice = str(getattr(settings, "SEARCH_ENCODER", DEFAULT_ENCODER))
    encoder = encoder_for(version) if choice == "inprocess" else None
    if encoder is None:
        return _encode_by_worker(image=image, version=version, keypoints=keypoints, item_weight=item_weight)
    started = time.perf_counter()
    # SIFT takes about as long as version 0's network (bench_encode): it runs on a pool thread meanwhile (OpenCV and
    # ONNX Runtime both release the GIL), so a shopper on a quiet machine waits for the slower of the two.
    extraction = _keypoint_pool().submit(_keypoints, image) if keypoints else None
    encoding, boxes, fused = encode_with_item(encoder, image, weight=item_weight)
    timings = {"encode": _ms(time.perf_counter() - started)}
    packed = None
    if extraction is not None:
        packed, timings["keypoints"] = extraction.result()
    query = query_payload.query_encoding(
        encoding,
        label_space=encoder.label_space,
        model_version_id=version.pk,
        keypoints=packed,
        item_boxes=boxes,
        item_fused=fused,
    )
    return EncodedQuery(encoding=query, encoder="inprocess", timings_ms=timings)


def _keypoints(image: Image.Image) -> tuple[bytes, float]:
    """The photo's packed local features, and how long extracting them took (ms)."""
    started = time.perf_counter()
    packed = geometry.pack(geometry.extract(image, side=geometry.QUERY_SIDE))
    return packed, _ms(time.perf_counter() - started)


@functools.cache
def _keypoint_pool() -> ThreadPoolExecutor:
    """One extraction thread per search the process runs at once (more could only queue for the cores)."""
    return ThreadPoolExecutor(max_workers=max(1, int(settings.SEARCH_MAX_CONCURRENT)), thread_name_prefix="keypoints")


def _encode_by_worker(
    *, image: Image.Image, version: ModelVersion, keypoints: bool, item_weight: float
) -> EncodedQuery:
    started = time.perf_counter()
    try:
        query = dispatch.encode_query(
            photo=query_payload.photo_jpeg(image), version_id=version.pk, keypoints=keypoints, item_weight=item_weight
        )
    except TimeoutError as exc:
        raise EncoderUnavailable(str(exc)) from exc
    return EncodedQuery(encoding=query, encoder="worker", timings_ms={"encode": _ms(time.perf_counter() - started)})


def encoder_for(version: ModelVersion) -> Encoder | None:
    """This process's encoder of the version (loaded now if it is not the one held); None without a usable export."""
    return _process_encoder.get(version)


def loaded_version() -> tuple[int, str] | None:
    """(version id, checkpoint) of the encoder this process holds, if any."""
    return _process_encoder.loaded()


def warm_up() -> str | None:
    """Load the active version's encoder now (a web process calls it once it has started, before a shopper's query
    would have to); the version's name, or None when nothing is active or it has no usable export."""
    version = selectors.model_version_active()
    if version is None or not version.checkpoint:
        return None
    return version.name if encoder_for(version) is not None else None


class _ProcessEncoder:
    """The process's encoder of the version searches serve; another version's search replaces it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[int, str] | None = None
        self._encoder: Encoder | None = None
        self._checked = 0.0  # when the current key was last looked for (retried after EXPORT_RETRY_S if missing)

    def get(self, version: ModelVersion) -> Encoder | None:
        key = (version.pk, version.checkpoint)
        with self._lock:
            stale = self._encoder is None and time.monotonic() - self._checked > EXPORT_RETRY_S
            if self._key != key or stale:
                self._encoder = None  # the old version's session goes before the new one loads
                self._encoder = _load(version)
                self._key, self._checked = key, time.monotonic()
            return self._encoder

    def loaded(self) -> tuple[int, str] | None:
        with self._lock:
            return self._key if self._encoder is not None else None


def _load(version: ModelVersion) -> Encoder | None:
    if not version.checkpoint:
        return None
    checkpoint = selectors.checkpoint_path(version=version)
    onnx_path = checkpoint.with_suffix(".onnx")
    if not onnx_path.exists():
        logger.warning("%s has no ONNX export at %s yet: its queries go to a search worker", version, onnx_path)
        return None
    started = time.perf_counter()
    try:
        network = OnnxNetwork(onnx_path, num_threads=max(1, int(settings.SEARCH_ENCODER_THREADS)))
    except Exception:  # an unreadable export must not stop search: a worker can still encode
        logger.exception("the ONNX export of %s could not be loaded: its queries go to a search worker", version)
        return None
    if not network.exported_from(checkpoint):
        logger.warning("the ONNX export of %s is older than its checkpoint: its queries go to a search worker", version)
        return None
    encoder = Encoder(network.checkpoint_metadata, network, Path(onnx_path))
    logger.info("loaded %s for in-process query encoding in %.0f ms", version, _ms(time.perf_counter() - started))
    return encoder


_process_encoder = _ProcessEncoder()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
