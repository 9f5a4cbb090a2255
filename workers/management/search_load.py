"""Shoppers posting photos to `POST /api/search` of a running server, as the API benchmarks measure it: one photo
posted (`post_photo`), and a load of many from several client threads (`search_load`). Shared by `bench_api` and
`bench_speed`, so both measure the same thing the same way.

A refused search (503: the web process's SEARCH_MAX_CONCURRENT, after its SEARCH_SLOT_WAIT_MS; 429: the throttle,
so start the server with a high SEARCH_THROTTLE_RATE) is counted by status and its client pauses REFUSED_PAUSE_S:
retrying in a tight loop would only measure how fast the server can refuse (and slow the searches it took).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np

WARMUP = 8  # the first requests load the encoder and the code index: not what a shopper waits for
REFUSED_PAUSE_S = 0.05
PERCENTILES = (50, 95, 99)


def post_photo(endpoint: str, photo: bytes, fields: dict[str, str] | None = None) -> tuple[int, float, dict]:
    """(status, client ms, the answer's JSON) of one multipart POST of `photo` as the form's `image`, with these
    other form fields (e.g. verify=false)."""
    boundary = uuid.uuid4().hex
    body = (
        "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
            for name, value in (fields or {}).items()
        ).encode()
        + (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="shot"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + photo
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        endpoint, data=body, method="POST", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        error.read()
        return error.code, (time.perf_counter() - started) * 1000, {}
    elapsed = (time.perf_counter() - started) * 1000
    return status, elapsed, json.loads(payload)


def warm_up(endpoint: str, photos: list[bytes], fields: dict[str, str] | None = None) -> None:
    for index in range(WARMUP):
        post_photo(endpoint, photos[index % len(photos)], fields)


def search_load(
    endpoint: str,
    photos: list[bytes],
    *,
    clients: int,
    answers: int,
    fields: dict[str, str] | None = None,
    after: Callable[[int, dict], None] | None = None,
) -> dict:
    """`clients` threads post the photos in turn until `answers` searches are answered (200): the client's latency
    of those, the server's `timings_ms` per stage, every status seen, answers per second. `after(photo index,
    answer)` runs in the client's thread after each answered search (at concurrency 1: between two searches)."""
    lock = threading.Lock()
    sent = 0
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    stages: dict[str, list[float]] = {}

    def client() -> None:
        nonlocal sent
        while True:
            with lock:
                if len(latencies) >= answers:
                    return
                index = sent % len(photos)
                sent += 1
            status, elapsed, answer = post_photo(endpoint, photos[index], fields)
            timings = answer.get("timings_ms", {}) if status == 200 else {}
            with lock:
                statuses[status] += 1
                counted = status == 200 and len(latencies) < answers
                if counted:
                    latencies.append(elapsed)
                    for stage, value in timings.items():
                        stages.setdefault(stage, []).append(value)
            if counted and after is not None:
                after(index, answer)
            if status not in (200, 429, 503):
                raise RuntimeError(f"POST {endpoint} answered {status}")
            if status != 200:
                time.sleep(REFUSED_PAUSE_S)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    client_ms = stats(latencies)
    return {
        "concurrency": clients,
        "answers": len(latencies),
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "answers_per_s": round(len(latencies) / wall, 2),
        "client_ms": client_ms,
        "p99_over_p50": round(client_ms["p99"] / client_ms["p50"], 2) if client_ms["p50"] else None,
        "server_ms": {stage: stats(values) for stage, values in stages.items()},
    }


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{p}": 0.0 for p in PERCENTILES} | {"max": 0.0}
    return {f"p{p}": round(float(np.percentile(values, p)), 2) for p in PERCENTILES} | {
        "max": round(float(np.max(values)), 2)
    }
