"""`manage.py bench_speed`: the speed table, one command. It composes the other benchmarks and writes JSON and a
markdown table (var/bench/speed.json, speed.md); docs/benchmarks.md says how each figure is measured.

- **search** (`bench_search`, its own throwaway database): each stage at 10k/100k/1M synthetic products next to its
  floor measured in the same run (the coarse selection vs reading the codes once and faiss IndexBinaryFlat, the fine
  stage vs an in-memory exact rerank of the same candidates), the memory per web process and the index load time;
  `--coarse-only-sizes 10000000` adds the coarse selection at 10M on codes built without PostgreSQL.
- **encode**: version 0 fitted at each `--input-sizes` on rendered products (and any `--checkpoints`), exported to
  ONNX, then torch vs ONNX Runtime on one thread: latency at batch 1, throughput at batch 32
  (`workers.ml.onnx_export.compare_speed`, preprocessing included).
- **intake** (no database): a shopper's photo through the search's intake as before (`image_validate`: checked,
  decoded at full size, re-encoded; then the query's 512-px copy) and now (`image_query`: the same checks, no
  re-encoded file, a JPEG decoded at reduced scale), interleaved on the same photos: phone JPEGs of 12, 3 and 0.5 MP
  and a PNG cut-out with alpha, next to decoding the file alone (Pillow, full size).
- **ingest** (`bench_ingest` in a throwaway database, one worker process): images per second per worker core, next
  to the model's own batch throughput measured in the same run, and the per-image cost of each stage.
- **load** (`bench_index_load`, its own throwaway database): a fresh web process's load of the memory index at
  100k and 1M products, from PostgreSQL and from the snapshot file, and its memory.
- **api** (with `--url` of a running server, e.g. `manage.py demo` with its search worker): `POST /api/search`
  latency p50/p95/p99 at concurrency 1 and 8, client-side and the server's own total; with `--merchant-token`, the
  time from adding a product through the merchant API until the search API returns it. Only public routes are used,
  so whatever encode path is the server's default is what is measured.

Sections: `--only search,encode,intake,ingest,load,api` (default: all; api needs --url). `--reuse-search JSON` and
`--reuse-ingest JSON` put earlier results in the table instead of measuring again.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from PIL import Image, ImageDraw

from catalog.dispatch import EMBED_CHUNK
from catalog.management.bench_database import run_inside_bench_database
from workers.management.search_load import search_load, warm_up
from workers.management.search_load import stats as latency_stats

SECTIONS = ("search", "encode", "intake", "ingest", "load", "api")
INGEST_DATABASE = "shop_search_bench_ingest"
FIT_SAMPLE = 300  # rendered products version 0 is fitted on for the encode section (its cost does not depend on it)
ENCODE_BATCH = 32
RENDER_SIZE = 256  # query and fit photos: a rendered product, about what a phone crop is after downscaling
INTAKE_JPEG_SIZES = ((4032, 3024), (2016, 1512), (816, 612))  # 12, 3 and 0.5 MP
FRESHNESS_TIMEOUT_S = 120.0


def _interleaved_encode_ms(onnx_of: dict[str, Path], repeats: int = 31) -> dict[str, float]:
    """Median ms of Encoder.encode on one photo (preprocessing included, one thread) for each model, the models
    taking turns photo by photo, so that a busy minute on the shared cores slows them all alike."""
    from workers.ml.encoder import Encoder

    encoders = {name: Encoder.load(path, num_threads=1) for name, path in onnx_of.items()}
    photo = [Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 220, 3), dtype=np.uint8))]
    timings: dict[str, list[float]] = {name: [] for name in encoders}
    for encoder in encoders.values():
        encoder.encode(photo)  # warm-up
    for _ in range(repeats):
        for name, encoder in encoders.items():
            started = time.perf_counter()
            encoder.encode(photo)
            timings[name].append((time.perf_counter() - started) * 1000)
    return {name: round(float(np.median(values)), 2) for name, values in timings.items()}


class Command(BaseCommand):
    help = "The speed table: search stages vs floors, encode, ingest, API latency; JSON + markdown."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
        parser.add_argument("--sizes", default="10000,100000,1000000", help="bench_search catalog sizes")
        parser.add_argument("--coarse-only-sizes", default="10000000", help="bench_search --coarse-only-sizes")
        parser.add_argument("--queries", type=int, default=200, help="bench_search queries per size")
        parser.add_argument("--input-sizes", default="224,112", help="version 0 input sizes for the encode section")
        parser.add_argument("--checkpoints", default="", help="comma-separated .pt files to time as well")
        parser.add_argument(
            "--encode-turns-only",
            action="store_true",
            help="encode section: only the interleaved batch-1 ONNX latencies (no torch, no batch throughput)",
        )
        parser.add_argument(
            "--recipes",
            default="{}",
            help='version 0 recipes to time as well, as JSON name -> fit_baseline arguments, e.g. \'{"lite2": '
            '{"backbone": "tf_efficientnet_lite2"}}\'; then all encoders take turns at batch 1 (interleaved medians)',
        )
        parser.add_argument("--intake-repeats", type=int, default=20, help="timed intakes per photo and path")
        parser.add_argument("--ingest-products", type=int, default=1000)
        parser.add_argument("--load-sizes", default="100000,1000000", help="bench_index_load catalog sizes")
        parser.add_argument(
            "--url", default="", help="a running server for the api section, e.g. http://127.0.0.1:8034"
        )
        parser.add_argument("--api-requests", type=int, default=200, help="measured searches per concurrency level")
        parser.add_argument(
            "--api-fields", nargs="*", default=[], help="extra form fields of every search, e.g. verify=false"
        )
        parser.add_argument(
            "--api-floors",
            action="store_true",
            help="at concurrency 1, each stage's floor measured between the searches (bench_api --floors; needs the "
            "server's database)",
        )
        parser.add_argument("--merchant-token", default="", help="a merchant user's API token: measures freshness")
        parser.add_argument("--merchant", default="", help="the merchant's slug, if the token acts for several")
        parser.add_argument(
            "--reuse-search",
            default="",
            help="bench_search JSONs (comma-separated: their sizes are put together) to use instead of running it",
        )
        parser.add_argument("--reuse-ingest", type=Path, help="a bench_ingest JSON to use instead of running it")
        parser.add_argument("--out", type=Path, default=Path(settings.VAR_DIR) / "bench" / "speed.json")

    def handle(self, *args, **options) -> None:
        only = {part.strip() for part in options["only"].split(",") if part.strip()}
        if unknown := only - set(SECTIONS):
            raise CommandError(f"unknown sections {sorted(unknown)}; use {SECTIONS}")
        out: Path = options["out"]
        out.parent.mkdir(parents=True, exist_ok=True)
        report: dict = json.loads(out.read_text()) if out.exists() else {}  # sections not re-run keep their numbers
        report["cpus"] = os.cpu_count()
        if "search" in only:
            report["search"] = self._search(options, out.parent)
        if "encode" in only:
            report["encode"] = self._encode(options)
        if "intake" in only:
            report["intake"] = self._intake(options)
        if "ingest" in only:
            report["ingest"] = self._ingest(options, out.parent)
        if "load" in only:
            report["load"] = self._load(out.parent, sizes=options["load_sizes"])
        if "api" in only:
            if not options["url"]:
                self.stdout.write("api: skipped (no --url)")
            else:
                report["api"] = self._api(options)
        out.write_text(json.dumps(report, indent=2))
        table = markdown(report)
        out.with_suffix(".md").write_text(table)
        self.stdout.write(table)
        self.stdout.write(f"written {out} and {out.with_suffix('.md')}")

    # -- sections ---------------------------------------------------------------------------------------------------
    def _search(self, options: dict, directory: Path) -> dict:
        if options["reuse_search"]:
            runs = [json.loads(Path(path).read_text()) for path in options["reuse_search"].split(",") if path.strip()]
            return {**runs[0], "sizes": [entry for run in runs for entry in run["sizes"]]}
        path = directory / "search.json"
        call_command(
            "bench_search", sizes=options["sizes"], backends="memory", queries=options["queries"],
            coarse_only_sizes=options["coarse_only_sizes"], out=path, stdout=self.stdout,
        )  # fmt: skip
        return json.loads(path.read_text())

    def _encode(self, options: dict) -> list[dict]:
        from workers.ml.baseline import fit_baseline
        from workers.ml.export import export
        from workers.ml.onnx_export import compare_speed

        pictures = [_rendered(seed) for seed in range(FIT_SAMPLE)]
        rows: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory() as scratch:
            models = [
                (f"version 0 ({size} px)", fit_baseline(pictures, out_path=Path(scratch) / f"v0-{size}.pt",
                                                        input_size=size, num_threads=1))
                for size in (int(s) for s in options["input_sizes"].split(",") if s.strip())
            ]  # fmt: skip
            models += [
                (name, fit_baseline(pictures, out_path=Path(scratch) / f"v0-{name}.pt", num_threads=1, **recipe))
                for name, recipe in json.loads(options["recipes"]).items()
            ]
            models += [(Path(path).stem, Path(path)) for path in options["checkpoints"].split(",") if path.strip()]
            onnx_of = {}
            for name, checkpoint in models:
                onnx = onnx_of[name] = export(checkpoint, Path(scratch) / f"{Path(checkpoint).stem}.onnx", verify=True)
                if options["encode_turns_only"]:
                    rows.append({"model": name})
                    continue
                torch_1, onnx_1 = compare_speed(checkpoint, onnx, batch_size=1, threads=1)
                torch_b, onnx_b = compare_speed(checkpoint, onnx, batch_size=ENCODE_BATCH, threads=1)
                row: dict[str, Any] = {
                    "model": name,
                    "batch1_ms": {"torch": round(torch_1, 2), "onnxruntime": round(onnx_1, 2)},
                    f"batch{ENCODE_BATCH}_images_per_s": {
                        "torch": round(1000 / torch_b, 1), "onnxruntime": round(1000 / onnx_b, 1)
                    },
                }  # fmt: skip
                rows.append(row)
                self.stdout.write(f"encode {json.dumps(row)}")
            if len(onnx_of) > 1:
                turns = _interleaved_encode_ms(onnx_of)
                for measured in rows:
                    measured["batch1_ms_interleaved"] = turns[str(measured["model"])]
                self.stdout.write(f"encode, taking turns (ONNX Runtime, batch 1, one thread): {json.dumps(turns)}")
        return rows

    def _intake(self, options: dict) -> list[dict]:
        from catalog.intake.images import image_downscale, image_query, image_validate
        from catalog.management.commands.bench_intake_memory import phone_photo
        from catalog.query_encoder import QUERY_MAX_SIDE

        paths: dict[str, Callable[[bytes], object]] = {
            "before": lambda data: image_downscale(image_validate(data).image, QUERY_MAX_SIDE),
            "after": lambda data: image_query(data, box=None, max_side=QUERY_MAX_SIDE),
            "decode_alone": lambda data: Image.open(io.BytesIO(data)).load(),
        }
        rows = []
        for name, data in _intake_photos(phone_photo):
            times: dict[str, list[float]] = {path: [] for path in paths}
            for repeat in range(options["intake_repeats"] + 1):
                for path, call in paths.items():  # interleaved: the machine's load hits every path alike
                    started = time.perf_counter()
                    call(data)
                    if repeat:  # the first round warms caches and allocators
                        times[path].append((time.perf_counter() - started) * 1000)
            stats = {path: latency_stats(values) for path, values in times.items()}
            row = {"photo": name, "bytes": len(data), **{f"{path}_ms": value for path, value in stats.items()}}
            row["speedup_p50"] = round(stats["before"]["p50"] / stats["after"]["p50"], 1)
            rows.append(row)
            self.stdout.write(f"intake {json.dumps(row)}")
        return rows

    def _ingest(self, options: dict, directory: Path) -> dict:
        if options["reuse_ingest"]:
            return json.loads(options["reuse_ingest"].read_text())
        path = directory / "ingest.json"
        run_inside_bench_database(
            command="bench_ingest", database=INGEST_DATABASE, inner_flag=False,
            argv=["--products", str(options["ingest_products"]), "--workers", "1", "--json", str(path)],
        )  # fmt: skip
        return json.loads(path.read_text())

    def _load(self, directory: Path, *, sizes: str) -> dict:
        path = directory / "index_load.json"
        call_command("bench_index_load", sizes=sizes, out=path)
        return json.loads(path.read_text())

    def _api(self, options: dict) -> dict:
        url = options["url"].rstrip("/")
        photos = [_jpeg(_rendered(seed)) for seed in range(50)]
        form = dict(field.split("=", 1) for field in options["api_fields"])
        result: dict = {"url": url, "fields": form}
        endpoint = f"{url}/api/search"
        floors = None
        if options["api_floors"]:
            from catalog import selectors
            from workers.management.commands.bench_api import StageFloors

            version = selectors.model_version_active()
            if version is None:
                raise CommandError("--api-floors: no active version in this database (use the server's settings)")
            floors = StageFloors(version=version, photos=photos)
        warm_up(endpoint, photos, form)
        for concurrency in (1, 8):
            measured = floors if concurrency == 1 else None
            level = search_load(
                endpoint, photos, clients=concurrency, answers=options["api_requests"], fields=form,
                after=None if measured is None else measured.measure,
            )  # fmt: skip
            if level["statuses"].get("429"):
                raise CommandError("the server throttled the searches: start it with a high SEARCH_THROTTLE_RATE")
            if measured is not None:
                level["floors"] = measured.report(level["server_ms"])
            result[f"concurrency_{concurrency}"] = level
            self.stdout.write(f"api concurrency {concurrency}: {json.dumps(level)}")
        if options["merchant_token"]:
            result["new_product_searchable_s"] = _freshness(url, options["merchant_token"], options["merchant"])
            self.stdout.write(f"api: a new product was searchable after {result['new_product_searchable_s']} s")
        return result


def _intake_photos(phone_photo: Callable[..., bytes]) -> list[tuple[str, bytes]]:
    """Phone JPEGs of 12, 3 and 0.5 MP and a product cut-out as a PNG with alpha (1.4 MP)."""
    photos = [(f"JPEG {w}x{h}", phone_photo(seed, w, h)) for seed, (w, h) in enumerate(INTAKE_JPEG_SIZES)]
    picture = Image.open(io.BytesIO(phone_photo(9, 1200, 1200))).convert("RGBA")
    alpha = Image.new("L", picture.size, 0)
    ImageDraw.Draw(alpha).ellipse([150, 100, 1050, 1100], fill=255)  # the product; transparent around it
    picture.putalpha(alpha)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return [*photos, ("PNG 1200x1200 RGBA", buffer.getvalue())]


# --- the api section -------------------------------------------------------------------------------------------
def _rendered(seed: int) -> Image.Image:
    from workers.ml.datasets.render import render_product

    return render_product(seed, 0, RENDER_SIZE).image.convert("RGB")


def _jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _post(url: str, *, fields: dict[str, str], files: dict[str, bytes], token: str = "") -> dict:
    body, content_type = _multipart(fields, files)
    headers = {"Content-Type": content_type, **({"Authorization": f"Token {token}"} if token else {})}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise HttpError(error.code, f"{url}: {error.code} {error.read()[:300]!r}") from None


class HttpError(CommandError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _freshness(url: str, token: str, merchant: str) -> float:
    """Seconds from adding a product and its photo through the merchant API to the search API returning it."""
    photo = _jpeg(_rendered(987_654_321 % 100_000 + int(time.time()) % 1000))
    sku = f"fresh-{uuid.uuid4().hex[:12]}"
    # (active spelled out: in a multipart form an absent boolean reads as false)
    fields = {"sku": sku, "title": "Freshness probe", "active": "true", **({"merchant": merchant} if merchant else {})}
    started = time.perf_counter()
    product = _post(f"{url}/api/merchant/products/", fields=fields, files={}, token=token)
    _post(f"{url}/api/merchant/products/{product['id']}/images/", fields={}, files={"file": photo}, token=token)
    while time.perf_counter() - started < FRESHNESS_TIMEOUT_S:
        answer = _post(f"{url}/api/search", fields={"k": "5"}, files={"image": photo})
        if any(hit.get("product", {}).get("id") == product["id"] for hit in answer.get("results", [])):
            return round(time.perf_counter() - started, 2)
        time.sleep(0.1)
    raise CommandError(f"the new product was not searchable within {FRESHNESS_TIMEOUT_S:.0f} s")


# --- the table -------------------------------------------------------------------------------------------------
def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value} s"


def markdown(report: dict) -> str:
    lines = [f"Machine: {report.get('cpus')} cores, shared; every ratio is to a floor measured in the same run.", ""]
    search = report.get("search")
    if search:
        lines += [
            "| products | read codes once | coarse selection (x floor, x faiss) | before: full scan + histogram "
            "| faiss IndexBinaryFlat top-1000 | fine, cards cached (x in-memory floor) | fine floor "
            "| fine, 1,000 candidates (x floor) | fine, cards read | before: fine in PostgreSQL "
            "| change-log poll | cascade p50 / p99 | recall@10 | index memory | index load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for entry in search["sizes"]:
            memory = entry["backends"]["memory"]
            coarse, fine = memory["coarse_floor"], memory.get("fine_floor")
            total = memory.get("total_ms")
            lines.append(
                f"| {entry['products']:,}{' (codes only)' if entry.get('coarse_only') else ''} "
                f"| {coarse['read_codes_once_ms']:.2f} ms "
                f"| {coarse['selection_ms']:.2f} ms ({coarse['selection_to_floor']:.2f}x, "
                f"{coarse['selection_to_faiss']:.2f}x) "
                f"| {coarse['full_scan_ms']:.2f} ms ({coarse['full_scan_to_floor']:.2f}x) "
                f"| {coarse['faiss_flat_ms']:.2f} ms "
                + (
                    f"| {fine['fine_ms']:.3f} ms ({fine['fine_to_floor']:.2f}x) | {fine['floor_in_memory_ms']:.3f} ms "
                    + (
                        f"| {fine['fine_1000_ms']:.3f} ms ({fine['fine_1000_to_floor']:.2f}x) "
                        f"| {fine['fine_cards_read_ms']:.2f} ms "
                        if "fine_1000_ms" in fine
                        else "| - | - "
                    )
                    + f"| {fine['fine_in_postgresql_ms']:.2f} ms | {fine['change_log_poll_ms']:.2f} ms "
                    if fine
                    else "| - | - | - | - | - | - "
                )
                + (
                    f"| {total['p50']:.1f} / {total['p99']:.1f} ms | {memory['recall_at_10']:.3f} "
                    if total
                    else "| - | - "
                )
                + f"| {memory['memory_mb']:.0f} MB | {_seconds(memory.get('load_s'))} |"
            )
        lines.append("")
    encode = report.get("encode")
    if encode and "batch1_ms" not in encode[0]:  # --encode-turns-only
        lines += ["| model | batch 1, one thread, ONNX Runtime, taking turns (median) |", "|---|---|"]
        lines += [f"| {row['model']} | {row.get('batch1_ms_interleaved', float('nan')):.1f} ms |" for row in encode]
        lines.append("")
    elif encode:
        lines += [
            f"| model | batch 1, one thread: torch | ONNX Runtime | batch {ENCODE_BATCH}, one thread: torch "
            "| ONNX Runtime |",
            "|---|---|---|---|---|",
        ]
        for row in encode:
            batch = row[f"batch{ENCODE_BATCH}_images_per_s"]
            lines.append(
                f"| {row['model']} | {row['batch1_ms']['torch']:.1f} ms | {row['batch1_ms']['onnxruntime']:.1f} ms "
                f"| {batch['torch']:.0f} images/s | {batch['onnxruntime']:.0f} images/s |"
            )
        lines.append("")
    intake = report.get("intake")
    if intake:
        lines += [
            "| shopper's photo (search intake, ms) | bytes | before: validate + re-encode p50 / p95 "
            "| after: image_query p50 / p95 | speed-up p50 | decoding the file alone p50 |",
            "|---|---|---|---|---|---|",
        ]
        for row in intake:
            before, after = row["before_ms"], row["after_ms"]
            lines.append(
                f"| {row['photo']} | {row['bytes']:,} | {before['p50']} / {before['p95']} | {after['p50']} / "
                f"{after['p95']} | {row['speedup_p50']}x | {row['decode_alone_ms']['p50']} |"
            )
        lines.append("")
    ingest = report.get("ingest")
    if ingest:
        lines += [
            f"Ingest ({ingest['products']:,} products, {ingest['workers']} worker process): "
            f"{ingest['images_per_s']} images/s end to end, {ingest['images_per_worker_cpu_s']} per worker CPU second"
            + (
                f"; the model alone, same run (batch {EMBED_CHUNK}, one thread): {ingest['model_images_per_s']} "
                f"images/s ({ingest.get('model_images_per_cpu_s', '-')} per CPU second), so ingest per worker "
                f"process = {ingest['ingest_per_worker_process_to_model']}x and per worker CPU second = "
                f"{ingest['ingest_per_worker_cpu_s_to_model']}x the model's throughput"
                if "model_images_per_s" in ingest
                else ""
            )
            + ".",
            "",
        ]
        profile = ingest.get("profile_ms_per_image")
        if profile:
            lines += [
                "| ingest stage (ms per image, one thread) | " + " | ".join(profile) + " |",
                "|---|" + "---|" * len(profile),
                "| | " + " | ".join(f"{value:.2f}" for value in profile.values()) + " |",
                "",
            ]
    load = report.get("load")
    if load:
        lines += [
            "| memory index load, a fresh web process (codes + 128-d fc7) | index memory "
            "| from PostgreSQL (binary COPY) | first load + writing the snapshot "
            "| from the snapshot + change-log catch-up | process RSS before / after / peak (from PostgreSQL) "
            "| RSS after / peak (from the snapshot) |",
            "|---|---|---|---|---|---|---|",
        ]
        for entry in load["sizes"]:
            lines.append(
                f"| {entry['products']:,} products | {entry['index_mb']:.0f} MB | {entry['load_s']:.2f} s "
                f"| {entry['load_and_write_snapshot_s']:.2f} s | {entry['snapshot_load_s']:.2f} s "
                f"| {entry['rss_before_mb']:.0f} / {entry['rss_after_mb']:.0f} / {entry['rss_peak_mb']:.0f} MB "
                f"| {entry['snapshot_rss_after_mb']:.0f} / {entry['snapshot_rss_peak_mb']:.0f} MB |"
            )
        lines.append("")
    api = report.get("api")
    if api:
        lines += [
            "| POST /api/search | answered/s | busy (503) | client p50 / p95 / p99 | server total p50 / p95 / p99 |",
            "|---|---|---|---|---|",
        ]
        for concurrency in (1, 8):
            level = api.get(f"concurrency_{concurrency}")
            if level:
                client, server = level["client_ms"], level["server_ms"]["total"]
                lines.append(
                    f"| concurrency {concurrency} | {level['answers_per_s']} "
                    f"| {level['statuses'].get('503', 0)} of {sum(level['statuses'].values())} "
                    f"| {client['p50']} / {client['p95']} / "
                    f"{client['p99']} ms | {server['p50']} / {server['p95']} / {server['p99']} ms |"
                )
        for concurrency in (1, 8):
            floors = (api.get(f"concurrency_{concurrency}") or {}).get("floors")
            if floors:
                lines.append(
                    f"\nConcurrency {concurrency}{', form ' + str(api['fields']) if api.get('fields') else ''}: "
                    f"server total p50 = **{floors['total_over_floors_plus_intake']}x** the floors + intake "
                    f"({floors['floors_plus_intake_ms']} ms: intake {floors['intake_ms_p50']}, "
                    + ", ".join(f"{stage} floor {ms}" for stage, ms in floors["floor_ms_p50"].items())
                    + f"; {floors['index_rows']:,} codes); stage / floor: "
                    + ", ".join(f"{stage} {ratio}x" for stage, ratio in floors["stage_over_floor_p50"].items())
                    + "."
                )
        if "new_product_searchable_s" in api:
            lines.append(f"\nA new product was searchable {api['new_product_searchable_s']} s after it was added.")
        lines.append("")
    return "\n".join(lines)
