"""Catalog manifests, CSV or JSON lines: one product per row, parsed into good rows and per-row errors with their
line numbers (a bad row never sinks the upload; a file that is not a manifest does)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from catalog.intake import IntakeError

MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # ~100k rows of generous width
MAX_MANIFEST_ROWS = 100_000  # one import; bigger catalogs upload in several
MAX_IMAGES_PER_ROW = 10  # product pages rarely show more; each one costs an embedding
MAX_ATTRIBUTES_PER_ROW = 50
MAX_PRICE = Decimal("9999999999.99")  # Product.price is DECIMAL(12, 2)
LIST_SEPARATORS = re.compile(r"[|;]")  # CSV cells holding lists: "red|striped", "a.jpg;b.jpg"
MANIFEST_REQUIRED = ("sku", "title")
MANIFEST_COLUMNS = ("sku", "title", "description", "category", "attributes", "price", "url", "images", "active")
_TRUE = {"1", "true", "yes", "y", "on"}
_FALSE = {"0", "false", "no", "n", "off"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RowInvalid(ValueError):
    """One manifest row is unusable; the import goes on without it."""


@dataclass(frozen=True)
class ManifestRow:
    line: int  # 1-based line in the manifest file where the row starts
    sku: str
    title: str
    description: str = ""
    category: str = ""
    attributes: tuple[str, ...] = ()
    price: str | None = None  # a decimal as text: rows travel as JSON to the chunk tasks
    url: str = ""
    active: bool = True
    images: tuple[str, ...] = ()  # archive entry names or http(s) URLs, main image first

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "attributes": list(self.attributes), "images": list(self.images)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ManifestRow:
        return cls(**{**data, "attributes": tuple(data["attributes"]), "images": tuple(data["images"])})


@dataclass(frozen=True)
class RowError:
    line: int
    sku: str
    error: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Manifest:
    format: str  # "csv" or "jsonl"
    rows: list[ManifestRow]
    errors: list[RowError]

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.errors)


def is_image_url(reference: str) -> bool:
    return reference.lower().startswith(("http://", "https://"))


def _text(value: Any, field: str, max_length: int, *, required: bool = False) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise RowInvalid(f"{field} must be text")
    text = _storable(str(value).strip(), field)
    if required and not text:
        raise RowInvalid(f"{field} is required")
    if len(text) > max_length:
        raise RowInvalid(f"{field} is longer than {max_length} characters")
    return text


def _list(value: Any, field: str) -> list[str]:
    if value is None or value == "":
        return []
    items = LIST_SEPARATORS.split(value) if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise RowInvalid(f"{field} must be a list of text (or text separated by | or ;)")
    return [_storable(item.strip(), field) for item in items if item.strip()]


def _storable(text: str, field: str) -> str:
    """Text PostgreSQL can store: no NUL character, no lone surrogate (JSON's "\u0000" and "\ud800" decode to
    both; either would fail the chunk's transaction instead of this one row)."""
    if "\x00" in text:
        raise RowInvalid(f"{field} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowInvalid(f"{field} is not valid Unicode text") from exc
    return text


def _error_sku(raw: dict[str, Any]) -> str:
    """The sku to name in a rejected row's error, made storable whatever the row held."""
    sku = str(raw.get("sku") or "").strip()[:100]
    return _CONTROL.sub("", sku.encode("utf-8", "replace").decode("utf-8"))


def _price(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise RowInvalid("price must be a number")
    try:
        price = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise RowInvalid(f"price {value!r} is not a number") from exc
    if not price.is_finite() or price < 0 or price > MAX_PRICE:
        raise RowInvalid(f"price {value!r} must be between 0 and {MAX_PRICE}")
    return str(price.quantize(Decimal("0.01")))


def _active(value: Any) -> bool:
    if value is None or value == "":
        return True
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise RowInvalid(f"active must be true or false, not {value!r}")


def _url(value: Any) -> str:
    url = _text(value, "url", 1000)
    if url and not is_image_url(url):
        raise RowInvalid("url must start with http:// or https://")
    return url


def manifest_row_validate(raw: dict[str, Any], *, line: int) -> ManifestRow:
    """One row of a manifest as a ManifestRow, or RowInvalid saying what is wrong with it."""
    sku = _text(raw.get("sku"), "sku", 100, required=True)
    if _CONTROL.search(sku):
        raise RowInvalid("sku must not contain control characters")
    attributes = _list(raw.get("attributes"), "attributes")
    if len(attributes) > MAX_ATTRIBUTES_PER_ROW:
        raise RowInvalid(f"more than {MAX_ATTRIBUTES_PER_ROW} attributes")
    images = _list(raw.get("images", raw.get("image")), "images")
    if len(images) > MAX_IMAGES_PER_ROW:
        raise RowInvalid(f"{len(images)} images; the limit is {MAX_IMAGES_PER_ROW} per product")
    if len(set(images)) != len(images):
        raise RowInvalid("the same image is listed twice")
    for reference in images:
        if len(reference) > 2000:
            raise RowInvalid("an image reference is longer than 2000 characters")
    return ManifestRow(
        line=line,
        sku=sku,
        title=_text(raw.get("title"), "title", 300, required=True),
        description=_text(raw.get("description"), "description", 20_000),
        category=_text(raw.get("category"), "category", 100),
        attributes=tuple(attributes),
        price=_price(raw.get("price")),
        url=_url(raw.get("url")),
        active=_active(raw.get("active")),
        images=tuple(images),
    )


def _csv_records(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise IntakeError("the manifest is empty") from None
    except csv.Error as exc:
        raise IntakeError(f"the manifest's header is not valid CSV: {exc}") from exc
    columns = [name.strip().lower().lstrip("\ufeff") for name in header]
    missing = [name for name in MANIFEST_REQUIRED if name not in columns]
    if missing:
        raise IntakeError(f"the manifest has no {', '.join(missing)} column (columns: {', '.join(MANIFEST_COLUMNS)})")
    if len(set(columns)) != len(columns):
        raise IntakeError("the manifest's header names a column twice")
    end = reader.line_num
    while True:
        start = end + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # an unterminated quote swallows the rest of the file: nothing after is usable
            yield start, {"__error__": f"not valid CSV: {exc}"}
            return
        end = reader.line_num
        if not values or all(not value.strip() for value in values):
            continue
        if len(values) != len(columns):
            yield start, {"__error__": f"{len(values)} fields; the header has {len(columns)}"}
            continue
        yield start, dict(zip(columns, values))


def _jsonl_records(text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, {"__error__": f"not valid JSON: {exc.msg} at column {exc.colno}"}
            continue
        except RecursionError:  # e.g. 10,000 nested lists: the parser gives up; the row is unusable, not the file
            yield number, {"__error__": "not valid JSON: nested too deeply"}
            continue
        if not isinstance(value, dict):
            yield number, {"__error__": "each line must be a JSON object"}
            continue
        yield number, {str(key).lower(): item for key, item in value.items()}


def manifest_format_detect(data: bytes, filename: str = "") -> str:
    suffix = Path(filename).suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    return "jsonl" if data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{" else "csv"


def manifest_parse(data: bytes, *, filename: str = "", manifest_format: str | None = None) -> Manifest:
    """Parse a CSV or JSON-lines manifest: good rows and per-row errors (with line numbers) side by side.

    Raises IntakeError only when the file as a whole is unusable (not text, no header, too big).
    """
    if not data.strip():
        raise IntakeError("the manifest is empty")
    if len(data) > MAX_MANIFEST_BYTES:
        raise IntakeError(f"the manifest is {len(data):,} bytes; the limit is {MAX_MANIFEST_BYTES:,}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise IntakeError(f"the manifest is not UTF-8 text (byte {exc.start})") from exc
    kind = manifest_format or manifest_format_detect(data, filename)
    if kind not in ("csv", "jsonl"):
        raise IntakeError(f"unknown manifest format {kind!r}; use csv or jsonl")
    records = _csv_records(text) if kind == "csv" else _jsonl_records(text)
    rows: list[ManifestRow] = []
    errors: list[RowError] = []
    first_line: dict[str, int] = {}
    for line, raw in records:
        if len(rows) + len(errors) >= MAX_MANIFEST_ROWS:
            raise IntakeError(f"the manifest has more than {MAX_MANIFEST_ROWS:,} rows; split it")
        sku = _error_sku(raw)
        if "__error__" in raw:
            errors.append(RowError(line, sku, raw["__error__"]))
            continue
        try:
            row = manifest_row_validate(raw, line=line)
        except RowInvalid as exc:
            errors.append(RowError(line, sku, str(exc)))
            continue
        if row.sku in first_line:
            errors.append(RowError(line, row.sku, f"sku {row.sku!r} already appears on line {first_line[row.sku]}"))
            continue
        first_line[row.sku] = line
        rows.append(row)
    if not rows and not errors:
        raise IntakeError("the manifest has a header but no rows")
    return Manifest(kind, rows, errors)
