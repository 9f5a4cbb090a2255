"""`manage.py bench_load`: a bounded load run of the real stack on loopback.

It starts the stack as deployed (deploy/Procfile: gunicorn with deploy/gunicorn.conf.py, a search worker, an embed
worker and a train worker, each its own Celery process) on 127.0.0.1, loads the sample shop (`demo_catalog`: 1,000
products, version 0 fitted and indexed), then lets N shoppers post photos to `POST /api/search` for T seconds. A
third of the way in, a merchant uploads a catalog (`POST /api/merchant/imports/`) and a new version is fitted and
switched to (fit on the train worker, index on the embed worker, activate): both run while the shoppers search.

It prints and writes (JSON and markdown): requests, errors (anything but 200 and 503; must be 0), the 503 "busy"
answers (a web process holds SEARCH_MAX_CONCURRENT searches at once; the others wait for a slot up to
SEARCH_SLOT_WAIT_MS, then get 503 with Retry-After, and a shopper then waits Retry-After, as a polite client
does), p50/p95/p99 of the client latency of answered searches, the median of each server-side stage
(`timings_ms`), and the search latency before, during and after the import and the switch: search has its own
worker, so the import must not move it.

Only the public HTTP API is used for shoppers and the merchant (the encode path and the cascade may change behind
it). Runs in a throwaway database, Redis db, media and models directory of its own (bench_database), dropped at
the end; the search throttle is lifted for the run (every shopper comes from 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from catalog.management.bench_database import (
    INNER_FLAG,
    INNER_HELP,
    options_argv,
    refuse_outside_bench_database,
    run_inside_bench_database,
)

BENCH_DATABASE = "shop_search_bench_load"
SHOPPER_PHOTOS = 60  # distinct shopper photos, each a re-shot (cropped, scaled, JPEG) catalog photo
STARTUP_TIMEOUT_S = 180.0
POLL_S = 0.5


@dataclass
class Sample:
    at_s: float  # when the request was sent, seconds from the start of the run
    latency_s: float
    status: int  # 0: no HTTP answer (connection error, timeout)
    timings_ms: dict[str, float] | None = None


@dataclass
class Events:
    """When the background work ran, seconds from the start of the run (None: did not happen within the run)."""

    import_posted: float | None = None
    import_done: float | None = None
    switch_started: float | None = None
    switch_indexing: float | None = None
    switch_active: float | None = None
    notes: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def latency_summary(samples: list[Sample]) -> dict:
    answered = [s.latency_s * 1000 for s in samples if s.status == 200]
    return {
        "searches": len(answered),
        "p50_ms": percentile(answered, 50),
        "p95_ms": percentile(answered, 95),
        "p99_ms": percentile(answered, 99),
    }


def summarise(samples: list[Sample], events: Events, duration_s: float) -> dict:
    """The numbers of a run: counts, client latency, server stage medians and latency per phase."""
    errors = [s for s in samples if s.status not in (200, 503)]
    stages: dict[str, list[float]] = {}
    for sample in samples:
        for stage, ms in (sample.timings_ms or {}).items():
            stages.setdefault(stage, []).append(ms)
    end = duration_s

    def between(start: float | None, stop: float | None) -> list[Sample]:
        if start is None:
            return []
        stop = end if stop is None else stop
        return [s for s in samples if start <= s.at_s < stop]

    first_work = min((t for t in (events.import_posted, events.switch_started) if t is not None), default=end)
    phases = {
        "before the import and the switch": latency_summary([s for s in samples if s.at_s < first_work]),
        "while the import ran": latency_summary(between(events.import_posted, events.import_done)),
        "while the switch ran (fit, index)": latency_summary(between(events.switch_started, events.switch_active)),
    }
    return {
        "requests": len(samples),
        "answered": sum(s.status == 200 for s in samples),
        "busy_503": sum(s.status == 503 for s in samples),
        "errors": len(errors),
        "error_statuses": sorted({s.status for s in errors}),
        "throughput_per_s": round(sum(s.status == 200 for s in samples) / max(duration_s, 1e-9), 2),
        "client_latency": latency_summary(samples),
        "server_stage_median_ms": {stage: round(float(np.median(v)), 1) for stage, v in sorted(stages.items())},
        "phases": phases,
    }


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, content_type) in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n")  # fmt: skip
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Command(BaseCommand):
    help = "Load-test the real stack on loopback: N shoppers searching for T seconds while an import and a switch run."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--products", type=int, default=1000, help="products in the shop before the run")
        parser.add_argument("--shoppers", type=int, default=50, help="concurrent shoppers")
        parser.add_argument("--duration", type=float, default=120.0, help="seconds of searching")
        parser.add_argument("--import-products", type=int, default=200, help="products in the merchant's upload")
        parser.add_argument("--port", type=int, default=8099, help="loopback port of the bench's gunicorn")
        parser.add_argument("--redis-db", type=int, default=13, help="Redis database of the bench (broker, cache)")
        parser.add_argument("--settle", type=float, default=600.0, help="seconds to wait for the import and switch")
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "load.json")
        parser.add_argument("--keep-database", action="store_true", help="leave the bench database for inspection")
        parser.add_argument(INNER_FLAG, action="store_true", help=INNER_HELP)

    def handle(self, *args, **options) -> None:
        if options["inside_bench_database"]:
            self._benchmark(**options)
            return
        names = ("products", "shoppers", "duration", "import_products", "port", "settle", "out")
        run_inside_bench_database(
            command="bench_load", database=BENCH_DATABASE, argv=options_argv(options, names),
            redis_db=options["redis_db"], keep=options["keep_database"],
        )  # fmt: skip

    # -- inside the bench database ----------------------------------------------------------------------------------
    def _benchmark(self, *, products: int, shoppers: int, duration: float, import_products: int, port: int,
                   settle: float, out: Path, **_) -> None:  # fmt: skip
        refuse_outside_bench_database(BENCH_DATABASE)
        call_command("migrate", interactive=False, verbosity=0)
        from shop_search.celery import app

        app.control.purge()  # the bench's own Redis db: nothing of anyone else's
        stack = Stack(port=port, log_dir=Path(settings.MEDIA_ROOT).parent / "logs")
        try:
            stack.start()
            started = time.monotonic()
            call_command("demo_catalog", products=products)
            setup_s = time.monotonic() - started
            token = _merchant_token()
            photos = _shopper_photos()
            upload = _import_upload(first=products, count=import_products)
            stack.wait_ready()
            warm_up_s = _warm_up(port, photos, concurrency=2 * Stack.worker_config["search"])
            self.stdout.write(f"stack up, shop loaded in {setup_s:.0f} s; {shoppers} shoppers for {duration:.0f} s")
            run = LoadRun(port=port, shoppers=shoppers, duration=duration, photos=photos)
            background = threading.Thread(target=self._background, args=(run, token, upload, duration), daemon=True)
            background.start()
            samples = run.go()
            background.join(timeout=5)
            self._settle(run, settle)
        finally:
            stack.stop()
        report = {
            "config": {
                "products": products, "shoppers": shoppers, "duration_s": duration, "import_products": import_products,
                "cpus": os.cpu_count(), "web": stack.web_config, "workers": stack.worker_config,
                "search_max_concurrent_per_web_process": int(settings.SEARCH_MAX_CONCURRENT), "setup_s": round(setup_s),
                "warm_up_s": round(warm_up_s, 1),
            },
            "events": run.events.__dict__,
            **summarise(samples, run.events, duration),
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        markdown = render_markdown(report)
        out.with_suffix(".md").write_text(markdown)
        self.stdout.write(markdown)
        self.stdout.write(f"written {out} and {out.with_suffix('.md')}")
        if report["errors"]:
            raise CommandError(f"{report['errors']} searches failed: {report['error_statuses']}")

    def _background(self, run: LoadRun, token: str, upload: tuple[bytes, bytes], duration: float) -> None:
        """A third of the way in: the merchant's upload, and a new version fitted and switched to."""
        time.sleep(duration / 3)
        try:
            job_id = _post_import(run.port, token, *upload)
            run.events.import_posted = run.elapsed()
            run.job = (token, job_id)
            run.events.switch_started = run.elapsed()
            run.switching = _start_switch()
            while run.elapsed() < duration:
                run.observe()
                time.sleep(POLL_S)
        except Exception as exc:  # reported, and the run's numbers still stand
            run.events.notes.append(f"background work failed: {type(exc).__name__}: {exc}")

    def _settle(self, run: LoadRun, settle: float) -> None:
        """After the shoppers stop: wait (bounded) for the import and the switch to finish, to state when they did."""
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and run.job is not None:
            run.observe()
            if run.events.import_done is not None and run.events.switch_active is not None:
                return
            time.sleep(POLL_S)
        if run.job is not None:
            run.events.notes.append(f"not finished {settle:.0f} s after the shoppers stopped")


class LoadRun:
    def __init__(self, *, port: int, shoppers: int, duration: float, photos: list[bytes]) -> None:
        self.port, self.shoppers, self.duration, self.photos = port, shoppers, duration, photos
        self.events = Events()
        self.samples: list[Sample] = []
        self.lock = threading.Lock()
        self.start = time.monotonic()
        self.job: tuple[str, int] | None = None
        self.switching: int | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def go(self) -> list[Sample]:
        self.start = time.monotonic()
        threads = [threading.Thread(target=self._shopper, args=(i,), daemon=True) for i in range(self.shoppers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=self.duration + 120)
        return sorted(self.samples, key=lambda s: s.at_s)

    def _shopper(self, index: int) -> None:
        rng = random.Random(index)
        time.sleep(rng.random())  # shoppers arrive over the first second, not in one burst
        while self.elapsed() < self.duration:
            body, content_type = multipart({}, {"image": ("photo.jpg", rng.choice(self.photos), "image/jpeg")})
            sent = self.elapsed()
            status, timings, retry_after = 0, None, 1.0
            # A connection per search, as a shopper's visit: a kept-alive one would be closed by gunicorn while the
            # shopper waits Retry-After (its keepalive is 2 s), and a POST on it fails before reaching the server.
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                connection.request("POST", "/api/search", body, {"Content-Type": content_type})
                response = connection.getresponse()
                data = response.read()
                status = response.status
                if status == 200:
                    timings = json.loads(data)["timings_ms"]
                retry_after = float(response.getheader("Retry-After") or 1)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with self.lock:
                    self.events.notes.append(f"no answer at {sent:.1f} s: {type(exc).__name__}: {exc}")
            finally:
                connection.close()
            with self.lock:
                self.samples.append(
                    Sample(at_s=sent, latency_s=self.elapsed() - sent, status=status, timings_ms=timings)
                )
            if status != 200:
                time.sleep(retry_after)  # a busy answer says when to come back

    def observe(self) -> None:
        """Record when the import finished and the switch reached indexing and active."""
        from catalog.models import ModelVersion

        if self.job is not None and self.events.import_done is None:
            token, job_id = self.job
            job = _get_json(self.port, f"/api/merchant/imports/{job_id}/", token)
            # done: every row processed and every new image embedded (the import's whole load on the workers)
            if job["state"] in ("done", "failed") and job["progress"]["images_pending"] == 0:
                self.events.import_done = self.elapsed()
                self.events.notes.append(
                    f"import {job['state']}: {job['ok']} rows imported, {job['rejected']} rejected, "
                    f"{job['progress']['images_new']} new images"
                )
        if self.switching is not None:
            status = ModelVersion.objects.get(pk=self.switching).status
            if status == "indexing" and self.events.switch_indexing is None:
                self.events.switch_indexing = self.elapsed()
            if status == "active" and self.events.switch_active is None:
                self.events.switch_active = self.elapsed()
            if status == "failed":
                self.events.notes.append("the new version failed to fit")
                self.switching = None


class Stack:
    """gunicorn and one Celery worker per queue, as deploy/Procfile runs them, on loopback."""

    web_config = {"server": "gunicorn (deploy/gunicorn.conf.py)", "processes": 2, "threads": 4}
    worker_config = {"search": 2, "embed": 2, "train": 1}  # concurrency per queue, as in deploy/Procfile

    def __init__(self, *, port: int, log_dir: Path) -> None:
        self.port = port
        self.log_dir = log_dir
        self.processes: list[subprocess.Popen] = []

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "shop_search.settings",
            "DEBUG": "0",
            "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(50),
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "SECURE_SSL_REDIRECT": "0",  # plain HTTP on loopback (production sits behind the TLS proxy)
            "SEARCH_THROTTLE_RATE": "1000000/min",  # every shopper here is 127.0.0.1
            "GUNICORN_BIND": f"127.0.0.1:{self.port}",
            "WEB_CONCURRENCY": str(self.web_config["processes"]),
            "GUNICORN_THREADS": str(self.web_config["threads"]),
        }

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        base = Path(settings.BASE_DIR)
        commands = {
            "web": [sys.executable, "-m", "gunicorn", "-c", str(base / "deploy" / "gunicorn.conf.py"),
                    "--access-logfile", "/dev/null", "shop_search.wsgi:application"],
        }  # fmt: skip
        for queue, concurrency in self.worker_config.items():
            commands[queue] = [sys.executable, "-m", "celery", "-A", "shop_search", "worker", "-Q", queue,
                               "--concurrency", str(concurrency), "--loglevel", "WARNING",
                               "-n", f"bench-{queue}@%h"]  # fmt: skip
        for name, command in commands.items():
            log = (self.log_dir / f"{name}.log").open("wb")
            self.processes.append(
                subprocess.Popen(command, cwd=base, env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            )  # fmt: skip

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(POLL_S)
        raise CommandError(f"gunicorn did not answer on 127.0.0.1:{self.port}; see {self.log_dir}")

    def stop(self) -> None:
        import signal

        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


# --- the shop's data --------------------------------------------------------------------------------------------------
def _merchant_token() -> str:
    from django.contrib.auth import get_user_model
    from rest_framework.authtoken.models import Token

    from catalog.models import Merchant

    merchant = Merchant.objects.order_by("pk").first()
    user = get_user_model().objects.create_user(f"bench-merchant-{uuid.uuid4().hex[:6]}")
    merchant.users.add(user)
    return Token.objects.create(user=user).key


def _shopper_photos() -> list[bytes]:
    """Shoppers' photos of catalog products: a stored product photo, cropped a little, scaled up, saved as JPEG."""
    from PIL import Image

    from catalog.models import ProductImage

    rng = np.random.default_rng(0)
    ids = list(ProductImage.objects.order_by("?").values_list("pk", flat=True)[:SHOPPER_PHOTOS])
    photos = []
    for image in ProductImage.objects.filter(pk__in=ids):
        with image.file.open("rb") as handle, Image.open(handle) as stored:
            picture = stored.convert("RGB")
            w, h = picture.size
            dx, dy = (int(v) for v in rng.integers(0, max(1, w // 10), 2))
            shot = picture.crop((dx, dy, w - dx // 2, h - dy // 2)).resize((480, 480 * h // max(w, 1)))
            buffer = io.BytesIO()
            shot.save(buffer, format="JPEG", quality=85)
            photos.append(buffer.getvalue())
    return photos


def _import_upload(*, first: int, count: int) -> tuple[bytes, bytes]:
    """A merchant's catalog upload: a CSV manifest of `count` new products and the zip of their photos."""
    from workers import sample_shop

    items, _ = sample_shop.sample_products(count=first + count)
    lines = ["sku,title,category,price,images"]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as files:
        for index, item in enumerate(items[-count:]):
            photo = item.photos()[0]
            files.writestr(f"img/{index}.png", photo)
            lines.append(f"UPLOAD-{index},{item.title.replace(',', ' ')},{item.category},{item.price},img/{index}.png")
    return ("\n".join(lines) + "\n").encode(), archive.getvalue()


def _warm_up(port: int, photos: list[bytes], *, concurrency: int) -> float:
    """Searches before the clock starts, a few at once, until each answers in under a second: every search worker
    process has loaded the network (a process loads it on its first query), which is start-up, not load."""
    started = time.monotonic()

    def one() -> float:
        body, content_type = multipart({}, {"image": ("photo.jpg", photos[0], "image/jpeg")})
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        sent = time.monotonic()
        connection.request("POST", "/api/search", body, {"Content-Type": content_type})
        connection.getresponse().read()
        return time.monotonic() - sent

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(10):
            if max(pool.map(lambda _: one(), range(concurrency))) < 1.0:
                break
    return time.monotonic() - started


def _post_import(port: int, token: str, manifest: bytes, archive: bytes) -> int:
    body, content_type = multipart(
        {}, {"manifest": ("catalog.csv", manifest, "text/csv"), "images": ("images.zip", archive, "application/zip")}
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request(
        "POST", "/api/merchant/imports/", body, {"Content-Type": content_type, "Authorization": f"Token {token}"}
    )
    response = connection.getresponse()
    data = response.read()
    if response.status != 202:
        raise CommandError(f"the import was refused: {response.status} {data[:300]!r}")
    return int(json.loads(data)["id"])


def _get_json(port: int, path: str, token: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", path, headers={"Authorization": f"Token {token}"})
    return json.loads(connection.getresponse().read())


def _start_switch() -> int:
    """A new version 0 (another seed) fitted on the train worker, then indexed and activated: a model switch."""
    from django.db import transaction

    from catalog import dispatch, selectors
    from catalog.models import ModelVersion

    active = selectors.model_version_active()
    if active is None:
        raise CommandError("no active version to switch from")
    with transaction.atomic():
        version = ModelVersion.objects.create(
            name=f"bench-refit-{uuid.uuid4().hex[:6]}", kind=ModelVersion.Kind.BASELINE,
            status=ModelVersion.Status.TRAINING, code_bits=active.code_bits, fc7_dim=active.fc7_dim,
            config={"baseline": {"seed": 1}},
        )  # fmt: skip
        dispatch.fit_baseline(version_id=version.pk)
    return version.pk


# --- the report -----------------------------------------------------------------------------------------------------
def render_markdown(report: dict) -> str:
    config, latency = report["config"], report["client_latency"]
    events = report["events"]

    def at(key: str) -> str:
        return "-" if events.get(key) is None else f"{events[key]:.0f} s"

    lines = [
        f"## Load run: {config['shoppers']} shoppers, {config['duration_s']:.0f} s, {config['products']:,} products",
        "",
        f"Stack on loopback: {config['web']['server']}, {config['web']['processes']} processes x "
        f"{config['web']['threads']} threads, at most {config['search_max_concurrent_per_web_process']} searches "
        f"per process; workers {config['workers']} (concurrency per queue); {config['cpus']} CPUs. Warm-up before the "
        f"clock (each search process loads the network on its first query): {config['warm_up_s']} s.",
        "",
        "| requests | answered (200) | busy (503) | errors | answered/s | p50 | p95 | p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {report['requests']} | {report['answered']} | {report['busy_503']} | {report['errors']} | "
        f"{report['throughput_per_s']} | {latency['p50_ms']} ms | {latency['p95_ms']} ms | {latency['p99_ms']} ms |",
        "",
        "Server-side stage medians (timings_ms): "
        + ", ".join(f"{stage} {ms} ms" for stage, ms in report["server_stage_median_ms"].items()),
        "",
        "| phase | searches | p50 | p95 | p99 |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {row['searches']} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} |"
            for name, row in report["phases"].items()
        ),
        "",
        f"Import posted at {at('import_posted')}, done at {at('import_done')}; switch started at "
        f"{at('switch_started')}, indexing at {at('switch_indexing')}, active at {at('switch_active')} "
        f"(times from the start of the run).",
        "",
        "503 answers are the search cap at work: a web process holds a few searches at once, lets the others wait "
        "for a slot briefly (SEARCH_SLOT_WAIT_MS) and then answers with Retry-After (the shopper retries then), so no "
        "thread waits behind a long queue of searches.",
    ]
    notes = events.get("notes", [])
    lines += [f"Note: {note}" for note in notes[:10]] + ([f"({len(notes) - 10} more notes)"] if len(notes) > 10 else [])
    return "\n".join(lines) + "\n"
