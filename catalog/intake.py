"""Untrusted input: every uploaded or fetched image passes through `image_validate` before anything stores or
encodes it. Uploads are hostile until validated: wrong formats, huge files, decompression bombs, truncated data
and EXIF tricks all end here as an `IntakeError` with a message fit for a 400 response.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import ipaddress
import json
import re
import socket
import ssl
import time
import urllib.parse
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # what phones and catalog exports produce
MAX_IMAGE_BYTES = 15 * 1024 * 1024  # a 48-MP phone JPEG is ~12 MB
MAX_IMAGE_PIXELS = 50_000_000  # beyond this a "photo" is a decompression bomb, not a product shot
MIN_IMAGE_SIDE = 16  # smaller than this carries no product to find
REENCODE_QUALITY = 92  # stored/encoded copies are re-encoded: no metadata, no polyglot payloads survive


class IntakeError(ValueError):
    """The input is unusable; the message says why, in words a shopper or merchant can act on."""


@dataclass(frozen=True)
class ValidatedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    data: bytes  # the re-encoded file to store
    extension: str  # of `data`
    sha256: str  # of the original upload: the same file uploaded twice has the same digest
    width: int
    height: int


def image_validate(data: bytes, *, max_bytes: int = MAX_IMAGE_BYTES) -> ValidatedImage:
    if not data:
        raise IntakeError("the image is empty")
    if len(data) > max_bytes:
        raise IntakeError(f"the image is {len(data):,} bytes; the limit is {max_bytes:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            if probe.format not in ALLOWED_FORMATS:
                allowed = ", ".join(sorted(ALLOWED_FORMATS))
                raise IntakeError(f"unsupported image format {probe.format or 'unknown'}; use {allowed}")
            width, height = probe.size
            if width * height > MAX_IMAGE_PIXELS:
                raise IntakeError(f"the image has {width * height:,} pixels; the limit is {MAX_IMAGE_PIXELS:,}")
            probe.verify()  # structure check; the object is unusable afterwards, so decode again below
            image = Image.open(io.BytesIO(data))
            image.load()
    except IntakeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise IntakeError("the image is too large when decoded (decompression bomb)") from exc
    except UnidentifiedImageError as exc:
        raise IntakeError("the file is not an image (or is corrupt)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise IntakeError(f"the image could not be decoded: {exc}") from exc

    image_format = image.format or "PNG"
    upright = ImageOps.exif_transpose(image)  # phones store rotation in EXIF; the pixels must be upright
    if min(upright.size) < MIN_IMAGE_SIDE:
        raise IntakeError(f"the image is {upright.width}x{upright.height}; each side must be at least {MIN_IMAGE_SIDE}")
    rgb = upright.convert("RGB")
    output = io.BytesIO()
    if image_format == "PNG":
        rgb.save(output, format="PNG", optimize=False)
    else:
        rgb.save(output, format="JPEG", quality=REENCODE_QUALITY)
    extension = "png" if image_format == "PNG" else "jpg"
    return ValidatedImage(
        image=rgb,
        data=output.getvalue(),
        extension=extension,
        sha256=hashlib.sha256(data).hexdigest(),
        width=rgb.width,
        height=rgb.height,
    )


def crop_box_apply(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Crop to a box given as fractions (x0, y0, x1, y1) of the image, as a browser crop widget reports it."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise IntakeError("the crop box must be x0 < x1 and y0 < y1, all within 0..1")
    pixels = (round(x0 * image.width), round(y0 * image.height), round(x1 * image.width), round(y1 * image.height))
    if min(pixels[2] - pixels[0], pixels[3] - pixels[1]) < MIN_IMAGE_SIDE:
        raise IntakeError("the crop box is too small")
    return image.crop(pixels)


# --- Zip archives of catalog images -------------------------------------------------------------------------------
# A zip is hostile until every entry has been read: names may climb out of any directory, entries may be symlinks,
# and headers may lie about sizes. Sizes are therefore counted while decompressing, never taken from the headers.

MAX_ZIP_ENTRIES = 50_000  # a 10k-product catalog with a few images each, plus directories
MAX_ZIP_TOTAL_BYTES = 4 * 1024 * 1024 * 1024  # uncompressed: ~20k full-size product photos
MAX_ZIP_ENTRY_BYTES = MAX_IMAGE_BYTES  # an entry is an image: no image may be larger
MAX_ZIP_RATIO = 50  # JPEG/PNG/WebP hardly compress; a 50:1 entry is a bomb, not a photo
ZIP_RATIO_MIN_BYTES = 256 * 1024  # below this a high ratio is harmless (a flat-colour PNG) and not judged
ZIP_READ_BLOCK = 64 * 1024  # decompress in blocks so a bomb is stopped after at most one block past a cap
_SYMLINK_MODE = 0o120000
_FILE_TYPE_MASK = 0o170000


class _ZipEntryTooLarge(IntakeError):
    pass


@dataclass(frozen=True)
class ZipEntry:
    name: str  # normalised: forward slashes, no leading "./"
    info: zipfile.ZipInfo


def _zip_name_normalise(raw: str) -> str:
    """The entry's path inside the archive, or IntakeError if it could point anywhere else (zip slip)."""
    if "\x00" in raw:
        raise IntakeError(f"zip entry {raw!r} has a NUL byte in its name")
    name = raw.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise IntakeError(f"zip entry {raw!r} has an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if any(part == ".." for part in parts):
        raise IntakeError(f"zip entry {raw!r} climbs out of the archive (path traversal)")
    return "/".join(parts)


class SafeZip:
    """A zip archive whose entry names were checked on open; entries are read with counted, capped sizes.

    `zip_check` reads every entry once (the upload is rejected as a whole if anything is wrong); chunks of an
    import then `read` only the entries they need, with the same caps.
    """

    def __init__(
        self,
        source: str | Path | BinaryIO,
        *,
        max_entries: int = MAX_ZIP_ENTRIES,
        max_entry_bytes: int = MAX_ZIP_ENTRY_BYTES,
    ) -> None:
        try:
            self._zip = zipfile.ZipFile(source)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise IntakeError("the images file is not a zip archive (or is corrupt)") from exc
        self.max_entry_bytes = max_entry_bytes
        infos = self._zip.infolist()
        if len(infos) > max_entries:
            raise IntakeError(f"the zip has {len(infos):,} entries; the limit is {max_entries:,}")
        self.entries: dict[str, ZipEntry] = {}
        by_basename: dict[str, list[str]] = {}
        for info in infos:
            name = _zip_name_normalise(info.filename)
            mode = (info.external_attr >> 16) & _FILE_TYPE_MASK
            if mode == _SYMLINK_MODE:
                raise IntakeError(f"zip entry {info.filename!r} is a symbolic link; only plain files are accepted")
            if info.flag_bits & 0x1:
                raise IntakeError(f"zip entry {info.filename!r} is encrypted")
            if info.is_dir() or not name:
                continue
            if name in self.entries:
                raise IntakeError(f"zip entry {name!r} appears twice")
            self.entries[name] = ZipEntry(name, info)
            by_basename.setdefault(name.rsplit("/", 1)[-1], []).append(name)
        # Manifests often name images without the folder they were zipped in: a unique base name is enough.
        self._basenames = {base: names[0] for base, names in by_basename.items() if len(names) == 1}

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> SafeZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve(self, reference: str) -> str | None:
        """The archive entry a manifest's image reference names (exact path, else a unique base name)."""
        try:
            name = _zip_name_normalise(reference)
        except IntakeError:
            return None
        if name in self.entries:
            return name
        return self._basenames.get(name)

    def read(self, name: str, *, limit: int | None = None) -> bytes:
        """The entry's bytes, decompressed in blocks and counted; IntakeError past `limit` or the ratio cap."""
        entry = self.entries[name]
        cap = self.max_entry_bytes if limit is None else min(limit, self.max_entry_bytes)
        compressed = max(entry.info.compress_size, 1)
        buffer = bytearray()
        try:
            with self._zip.open(entry.info) as handle:
                while block := handle.read(ZIP_READ_BLOCK):
                    buffer += block
                    if len(buffer) > cap:
                        raise _ZipEntryTooLarge(f"zip entry {name!r} is larger than {cap:,} bytes")
                    if len(buffer) > ZIP_RATIO_MIN_BYTES and len(buffer) / compressed > MAX_ZIP_RATIO:
                        raise IntakeError(
                            f"zip entry {name!r} expands more than {MAX_ZIP_RATIO}:1 (a zip bomb, not an image)"
                        )
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as exc:
            raise IntakeError(f"zip entry {name!r} is corrupt: {exc}") from exc
        return bytes(buffer)


def zip_check(source: str | Path | BinaryIO, *, max_total_bytes: int = MAX_ZIP_TOTAL_BYTES) -> list[str]:
    """Open and fully read a zip, counting real bytes; returns its file names or raises IntakeError."""
    total = 0
    with SafeZip(source) as archive:
        for name in archive.entries:
            remaining = max_total_bytes - total
            try:
                total += len(archive.read(name, limit=remaining))
            except _ZipEntryTooLarge:
                if remaining >= archive.max_entry_bytes:
                    raise
                raise IntakeError(f"the zip expands to more than {max_total_bytes:,} bytes") from None
        return list(archive.entries)


# --- Catalog manifests: CSV or JSON lines ----------------------------------------------------------------------------

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
    text = str(value).strip()
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
    return [item.strip() for item in items if item.strip()]


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
        sku = str(raw.get("sku") or "").strip()[:100]
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


# --- Image URLs ----------------------------------------------------------------------------------------------------

IMAGE_FETCH_TIMEOUT_S = 10.0  # per connect/read: a catalog host slower than this is down for our purposes
IMAGE_FETCH_DEADLINE_S = 30.0  # whole download: a trickling server must not hold an import chunk hostage
IMAGE_FETCH_MAX_REDIRECTS = 3  # CDNs redirect once or twice; more is a loop or a trick
IMAGE_FETCH_SCHEMES = ("http", "https")


def _address_allowed(address: str, allowed_networks: Sequence[str]) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in ipaddress.ip_network(network, strict=False) for network in allowed_networks):
        return True
    # is_global is False for loopback, private, link-local, shared (CGNAT), reserved and documentation ranges.
    return ip.is_global and not ip.is_multicast


def _resolve_allowed(host: str, port: int, allowed_networks: Sequence[str]) -> str:
    """The address to connect to: every address the name resolves to must pass, so a name that mixes a public and
    a private address cannot be used to reach the private one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise IntakeError(f"the image host {host!r} could not be resolved") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise IntakeError(f"the image host {host!r} could not be resolved")
    for address in addresses:
        if not _address_allowed(address, allowed_networks):
            raise IntakeError(f"the image host {host!r} resolves to a non-public address ({address}); not fetched")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that passed the policy, not to whatever the name resolves to a moment later."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def url_fetch(
    url: str,
    *,
    max_bytes: int = MAX_IMAGE_BYTES,
    timeout: float = IMAGE_FETCH_TIMEOUT_S,
    deadline: float = IMAGE_FETCH_DEADLINE_S,
    allowed_networks: Sequence[str] = (),
) -> bytes:
    """GET an image URL under the fetch policy: http(s) only, public addresses only (checked on the resolved
    address of every hop, redirects included) unless `allowed_networks` opens a range, bytes counted while
    streaming. IntakeError says what went wrong."""
    started = time.monotonic()
    for _ in range(IMAGE_FETCH_MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in IMAGE_FETCH_SCHEMES:
            raise IntakeError(f"image URLs must be http or https, not {parts.scheme or 'none'!r}")
        if not parts.hostname:
            raise IntakeError(f"the image URL {url!r} has no host")
        if parts.username or parts.password:
            raise IntakeError("image URLs must not carry credentials")
        try:
            port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        except ValueError as exc:
            raise IntakeError(f"the image URL {url!r} has an invalid port") from exc
        address = _resolve_allowed(parts.hostname, port, allowed_networks)
        connection_class = _PinnedHTTPSConnection if parts.scheme.lower() == "https" else _PinnedHTTPConnection
        connection = connection_class(parts.hostname, port, address, timeout)
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        try:
            connection.request("GET", target, headers={"User-Agent": "shop_search-ingest/1", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise IntakeError(f"the image URL redirected ({response.status}) without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if response.status != 200:
                raise IntakeError(f"the image URL answered HTTP {response.status}")
            declared = response.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise IntakeError(f"the image at the URL is {int(declared):,} bytes; the limit is {max_bytes:,}")
            buffer = bytearray()
            while block := response.read(ZIP_READ_BLOCK):
                buffer += block
                if len(buffer) > max_bytes:
                    raise IntakeError(f"the image at the URL is larger than {max_bytes:,} bytes")
                if time.monotonic() - started > deadline:
                    raise IntakeError(f"the image URL took longer than {deadline:.0f} s to download")
            return bytes(buffer)
        except (OSError, http.client.HTTPException) as exc:
            raise IntakeError(f"the image URL could not be fetched: {exc}") from exc
        finally:
            connection.close()
    raise IntakeError(f"the image URL redirected more than {IMAGE_FETCH_MAX_REDIRECTS} times")
