"""Geometric verification: local features of a photo, packed compactly, matched with RANSAC. Pure numpy + OpenCV.

The search's verify stage (catalog.search) asks: does the shopper's photo show the same object as this candidate's
catalog image, seen from somewhere else? SIFT keypoints of both (grey, the longer side scaled to CATALOG_SIDE px for a
catalog image, QUERY_SIDE px for the shopper's photo), nearest-neighbour matches of their RootSIFT forms
(`root_sift`) that pass Lowe's ratio test, and a robust (USAC) homography: the matches it explains are the
**inliers**. A different product rarely gets far past MIN_MATCHES (99% of the hardest look-alikes end with at most 8
inliers on the held-out validation photos, 11 with raw SIFT: `manage.py bench_verify`); the same product gets tens
on a clear view, and on the harsh held-out photos (small, tilted, blurred, on clutter) often a few, often none:
verification lifts some of them, never hurts much.

Who runs what: the embedding worker extracts and packs a catalog image's features once (they depend on the image
alone, not on a model version); the shopper's photo has its features extracted where it is encoded (in the web
process alongside the network, catalog.query_encoder, or by the query-encoding worker, which returns them in the
query payload); the web process unpacks and matches. Nothing here imports Django or torch.

Packed format (`pack`/`unpack`), little-endian: b"KP", format version (u8), descriptor bytes (u8), feature count
(u16), working-image width and height (u16 each), then count x 2 float16 xy (pixels of the working image), then
count x 128 uint8 SIFT descriptors (OpenCV's SIFT descriptors are integers 0..255 stored as float: uint8 is
lossless). 10 + 132 bytes per feature: 16,906 bytes for MAX_FEATURES = 128.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

# --- tunables (scripts in the benchmark command `bench_verify`; numbers in the README) ----------------------------
# Features are extracted on the grey image scaled to this longer side. SIFT's cost follows the area (its pyramid
# starts at twice the side), and SIFT is scale-invariant, so the two sides need not agree. A catalog image is a
# packshot that the product fills: at 128 px, verification gains as much as at 256 px (validation split, two seeds:
# R@1 after the re-rank 0.443 against 0.447, every real photo still first) for 0.38x the CPU (2.8 ms instead of
# 7.4 ms), and the embed worker extracts every catalog image once. A shopper's photo may show the item small among
# clutter: at 256 px its features verify better than at 160 px, and with both sides at 128 px a real photo of a
# boxed product among other objects lost rank 1. `manage.py bench_verify --catalog-side/--query-side`, README
# "Geometric verification".
CATALOG_SIDE = 128
QUERY_SIDE = 256
MAX_FEATURES = 128  # the strongest SIFT keypoints kept per image: storage, matching time and gain all follow it
RATIO = 0.8  # Lowe's ratio test: a match counts when its nearest neighbour is this much closer than the second
MIN_MATCHES = 6  # fewer tentative matches: no RANSAC (early exit), zero inliers; chance matches rarely reach it
# Reprojection error within which a match is an inlier, as a share of the candidate's working image's longer side
# (8 px of 256): the same tolerance for features stored at any side.
RANSAC_SHARE = 8.0 / 256
RANSAC_ITERATIONS = 500  # cap: with >= 30% inliers RANSAC stops far earlier by itself
# OpenCV's USAC with MAGSAC++ scoring: as robust as classic RANSAC here, and it stops early on hopeless match sets
# where classic RANSAC runs all its iterations (50x faster on 20 look-alike candidates: `manage.py bench_verify`).
RANSAC_METHOD = cv2.USAC_MAGSAC
OPENCV_THREADS = 1  # one request, one core: OpenCV's own thread pool would fight the other requests

_FORMAT_VERSION = 1
_MAGIC = b"KP"
_HEADER = struct.Struct("<2sBBHHH")
DESCRIPTOR_BYTES = 128

cv2.setNumThreads(OPENCV_THREADS)
_local = threading.local()  # OpenCV detector objects are not documented as thread-safe: one per thread


@dataclass(frozen=True)
class LocalFeatures:
    xy: np.ndarray  # float32 (n, 2): keypoint positions in pixels of the working image
    descriptors: np.ndarray  # uint8 (n, DESCRIPTOR_BYTES)
    size: tuple[int, int] = (0, 0)  # working-image width, height

    def __len__(self) -> int:
        return len(self.xy)


@dataclass(frozen=True)
class Verification:
    matches: int  # tentative matches that passed the ratio test
    inliers: int  # of those, the ones the RANSAC homography explains (0 when there were too few to try)


def _sift() -> cv2.SIFT:
    detector = getattr(_local, "sift", None)
    if detector is None:
        detector = _local.sift = cv2.SIFT.create(nfeatures=MAX_FEATURES)
    return detector


def working_grey(image: Image.Image | np.ndarray, side: int) -> np.ndarray:
    """The grey uint8 image features are extracted from: longer side scaled (up or down) to `side`."""
    if isinstance(image, Image.Image):
        grey = np.asarray(image.convert("L"))
    else:
        grey = np.asarray(image)
        if grey.ndim == 3:
            grey = cv2.cvtColor(grey, cv2.COLOR_RGB2GRAY)
    height, width = grey.shape[:2]
    scale = side / max(height, width)
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def extract(image: Image.Image | np.ndarray, *, side: int) -> LocalFeatures:
    """Up to MAX_FEATURES SIFT keypoints and descriptors of a photo (PIL image, or an RGB/grey uint8 array), its
    longer side scaled to `side` px: CATALOG_SIDE for a catalog image, QUERY_SIDE for a shopper's photo."""
    grey = working_grey(image, side)
    keypoints, descriptors = _sift().detectAndCompute(grey, None)
    keypoints = keypoints[:MAX_FEATURES]  # SIFT may return a few more than asked (equal responses)
    size = (int(grey.shape[1]), int(grey.shape[0]))
    if descriptors is None or not keypoints:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, DESCRIPTOR_BYTES), np.uint8), size)
    xy = np.array([point.pt for point in keypoints], np.float32)
    packed = np.clip(np.rint(descriptors[: len(keypoints)]), 0, 255).astype(np.uint8)
    return LocalFeatures(xy, packed, size)


def pack(features: LocalFeatures) -> bytes:
    count = len(features)
    header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, DESCRIPTOR_BYTES, count, *features.size)
    xy = np.ascontiguousarray(features.xy, dtype="<f2").tobytes()
    return header + xy + np.ascontiguousarray(features.descriptors, dtype=np.uint8).tobytes()


def unpack(data: bytes | memoryview) -> LocalFeatures:
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise ValueError(f"packed local features are at least {_HEADER.size} bytes, not {len(data)}")
    magic, version, width_bytes, count, width, height = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _FORMAT_VERSION or width_bytes != DESCRIPTOR_BYTES:
        raise ValueError(f"not packed local features of format {_FORMAT_VERSION} ({magic!r}, {version})")
    offset = _HEADER.size
    expected = offset + count * (4 + DESCRIPTOR_BYTES)
    if len(data) != expected:
        raise ValueError(f"packed local features of {count} points are {expected} bytes, not {len(data)}")
    xy = np.frombuffer(data, "<f2", count * 2, offset).astype(np.float32).reshape(count, 2)
    descriptors = np.frombuffer(data, np.uint8, count * DESCRIPTOR_BYTES, offset + count * 4)
    return LocalFeatures(xy, descriptors.reshape(count, DESCRIPTOR_BYTES), (width, height))


def verify(query: LocalFeatures, candidate: LocalFeatures) -> Verification:
    """Ratio-test matches of the query's descriptors among the candidate's, then a robust homography."""
    result = verify_many(query, [candidate])[0]
    assert result is not None
    return result


def verify_many(query: LocalFeatures, candidates: Sequence[LocalFeatures | None]) -> list[Verification | None]:
    """verify() against each candidate (None where a candidate has no features stored).

    Matching is one matrix product of the query's descriptors with all candidates' (squared L2 from dot products),
    then each candidate's two nearest neighbours per query feature for the ratio test: one GEMM instead of a
    matcher per candidate. A candidate with fewer than MIN_MATCHES matches skips RANSAC (early exit)."""
    results: list[Verification | None] = [None if candidate is None else Verification(0, 0) for candidate in candidates]
    usable = [i for i, c in enumerate(candidates) if c is not None and len(c) >= 2]
    if len(query) < MIN_MATCHES or not usable:
        return results
    query_descriptors = root_sift(query.descriptors)
    stacked = root_sift(np.concatenate([candidates[i].descriptors for i in usable]))  # type: ignore[union-attr]
    # OpenCV's GEMM, not numpy's: on OpenCV's one thread it stays fast in a busy process, where a multithreaded
    # BLAS pinned to one core spins (3x slower at p50 in `manage.py bench_verify`).
    products = cv2.gemm(query_descriptors, stacked, -2.0, None, 0.0, flags=cv2.GEMM_2_T)  # type: ignore[call-overload]
    distances = (
        products
        + np.einsum("ij,ij->i", query_descriptors, query_descriptors)[:, None]
        + np.einsum("ij,ij->i", stacked, stacked)[None, :]
    )
    start = 0
    for i in usable:
        candidate = candidates[i]
        assert candidate is not None
        block = distances[:, start : start + len(candidate)]
        start += len(candidate)
        nearest = block.argmin(axis=1)
        two = np.partition(block, 1, axis=1)[:, :2]
        good = np.flatnonzero(np.maximum(two[:, 0], 0.0) < RATIO * RATIO * np.maximum(two[:, 1], 0.0))
        if len(good) < MIN_MATCHES:
            results[i] = Verification(len(good), 0)
            continue
        threshold = RANSAC_SHARE * (max(candidate.size) or QUERY_SIDE)  # size (0, 0): not known
        results[i] = Verification(len(good), _inliers(query.xy[good], candidate.xy[nearest[good]], threshold))
    return results


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic and Zisserman, 2012): each SIFT descriptor divided by its sum, then its square root, as
    float32. The Euclidean distance between two of these is the Hellinger distance between the SIFT histograms,
    which lets a few large gradient bins (an edge of the backdrop, a shadow) dominate less than plain L2 does, so the
    ratio test keeps more true matches. Stored descriptors stay SIFT's own: the change costs no re-extraction, only
    a square root per value at match time. Rows of zeros stay zeros."""
    values = descriptors.astype(np.float32)
    values /= np.maximum(values.sum(axis=1, keepdims=True), 1e-12)
    return np.sqrt(values, out=values)


def _inliers(source: np.ndarray, target: np.ndarray, threshold_px: float) -> int:
    _, mask = cv2.findHomography(source, target, RANSAC_METHOD, threshold_px, maxIters=RANSAC_ITERATIONS)
    return int(mask.sum()) if mask is not None else 0
