"""`manage.py bench_pad_catalog --products 999000 --yes`: pad THIS database's active version with synthetic
look-alike products, so that `POST /api/search` can be measured at 1M products (`bench_speed --only api`,
`bench_api`) on a demo that serves a real model version. For a throwaway demo database only (e.g. a worktree's own
var/): it writes into the shop's tables.

Each padded product has one image (no file behind it: its card's image URL leads nowhere) and one embedding of the
active version, made from a real one (not a padded one) picked at random: its fc7 plus Gaussian noise (rescaled to
the real vector's length) and its code with PAD_BIT_FLIPS of the bits flipped, so that the codes and vectors are
spread as the version's own are. All belong to one merchant (`--merchant`, default "bench-pad"); `--remove`
deletes them.

Rows are written by COPY with triggers and foreign-key checks off (as bench_search does), so the change log does
not see them: restart the web processes afterwards (their memory index loads the version again).
"""

from __future__ import annotations

import time

import numpy as np
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction

from catalog import selectors
from catalog.codes import bitstring_pack, code_sql, version_sql
from catalog.management.commands.bench_search import COPY_CHUNK, _drop_hnsw
from catalog.models import Merchant
from catalog.services import model_versions

PAD_BIT_FLIPS = 0.15  # of a real code's bits, flipped in its padded look-alike
PAD_FC7_NOISE = 0.5  # noise length relative to the real fc7's length
PAD_TABLES = ("catalog_product", "catalog_productimage", "catalog_imageembedding")


class Command(BaseCommand):
    help = "Pad this database's active version with synthetic look-alike products (API benchmarks at 1M)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--products", type=int, default=999_000)
        parser.add_argument("--merchant", default="bench-pad")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--remove", action="store_true", help="delete the padded products instead")
        parser.add_argument("--yes", action="store_true", help="yes, write into this database (a throwaway demo)")

    def handle(self, *args, products: int, merchant: str, seed: int, remove: bool, yes: bool, **options) -> None:
        if not yes:
            raise CommandError("this writes synthetic products into the configured database: pass --yes")
        if remove:
            self._remove(merchant)
            return
        version = selectors.model_version_active()
        if version is None:
            raise CommandError("no active model version: run `manage.py demo` first")
        started = time.perf_counter()
        owner, _ = Merchant.objects.get_or_create(slug=merchant, defaults={"name": "Benchmark padding"})
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT ({code_sql('e.code', version.code_bits)})::text, e.fc7::text FROM catalog_imageembedding e "
                f"JOIN catalog_product p ON p.id = e.product_id WHERE {version_sql('e', version.pk)} "
                "AND p.merchant_id <> %s",
                [owner.pk],
            )
            real = cursor.fetchall()
        if not real:
            raise CommandError(f"version {version.name} has no embeddings to imitate")
        codes = np.stack([bitstring_pack(bits) for bits, _ in real])
        fc7 = np.stack([np.fromstring(vector.strip("[]"), np.float32, sep=",") for _, vector in real])
        rng = np.random.default_rng(seed)
        # Inserting into the version's HNSW graph row by row took ~6 ms a row on this machine (99k: ten minutes);
        # only the SQL backend reads it, and --remove builds it again.
        _drop_hnsw(version)
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute(
                "CREATE TEMP TABLE pad_embedding (id bigint, image_id bigint, product_id bigint,"
                " model_version_id bigint, code bit varying, fc7 vector) ON COMMIT DROP"
            )
            cursor.execute("SELECT max(id) FROM catalog_product")
            first_product = int(cursor.fetchone()[0] or 0) + 1
            cursor.execute("SELECT max(id) FROM catalog_productimage")
            first_image = int(cursor.fetchone()[0] or 0) + 1
            cursor.execute("SELECT max(id) FROM catalog_imageembedding")
            first_embedding = int(cursor.fetchone()[0] or 0) + 1
            for start in range(0, products, COPY_CHUNK):
                count = min(COPY_CHUNK, products - start)
                picked = rng.integers(0, len(real), count)
                _pad_chunk(
                    cursor=cursor, owner=owner.pk, version=version, rng=rng,
                    products=first_product + start + np.arange(count), images=first_image + start + np.arange(count),
                    embeddings=first_embedding + start + np.arange(count),
                    codes=_flipped(codes[picked], rng), fc7=_noisy(fc7[picked], rng),
                )  # fmt: skip
                self.stdout.write(f"padded {start + count:,} of {products:,}")
            for table in PAD_TABLES:
                cursor.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        self.stdout.write(
            f"padded version {version.name} with {products:,} products of merchant {merchant!r} in "
            f"{time.perf_counter() - started:.0f} s; restart the web processes so that their index loads them. The "
            "version's HNSW index (the SQL backend's) was dropped: `--remove` builds it again"
        )

    def _remove(self, merchant: str) -> None:
        owner = Merchant.objects.filter(slug=merchant).first()
        if owner is None:
            self.stdout.write(f"no merchant {merchant!r}: nothing to remove")
            return
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET LOCAL session_replication_role = replica")
            product_ids = "SELECT id FROM catalog_product WHERE merchant_id = %s"
            cursor.execute(f"DELETE FROM catalog_imageembedding WHERE product_id IN ({product_ids})", [owner.pk])
            cursor.execute(f"DELETE FROM catalog_productimage WHERE product_id IN ({product_ids})", [owner.pk])
            cursor.execute("DELETE FROM catalog_product WHERE merchant_id = %s", [owner.pk])
            cursor.execute("DELETE FROM catalog_merchant WHERE id = %s", [owner.pk])
        version = selectors.model_version_active()
        if version is not None:
            model_versions.code_index_ensure(version=version)
        self.stdout.write(f"removed merchant {merchant!r} and its products; restart the web processes")


def _flipped(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    bits = np.unpackbits(codes, axis=1).astype(bool)
    bits ^= rng.random(bits.shape) < PAD_BIT_FLIPS
    return np.packbits(bits, axis=1)


def _noisy(fc7: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lengths = np.linalg.norm(fc7, axis=1, keepdims=True)
    noise = rng.standard_normal(fc7.shape).astype(np.float32)
    noise *= PAD_FC7_NOISE * lengths / np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-9)
    moved = fc7 + noise
    return (moved * lengths / np.maximum(np.linalg.norm(moved, axis=1, keepdims=True), 1e-9)).astype(np.float32)


def _pad_chunk(*, cursor, owner: int, version, rng, products, images, embeddings, codes, fc7) -> None:
    """One chunk of products, images and embeddings by COPY (every NOT NULL column named: the tables have no
    column defaults); embeddings through a temporary table, their other columns filled by the INSERT."""
    raw = cursor.connection  # psycopg's connection: COPY
    rows = "".join(
        f"{p}\t{owner}\tPAD-{p}\tPadded product {p}\t\t\t[]\t{10 + p % 90}.99\t\tt\tnow\tnow\n"
        for p in products.tolist()
    )
    files = "".join(
        f"{i}\t{p}\tpadded/{p}.png\t{i:064x}\t256\t256\t0\t0\t\tembedded\t\tnow\t0\t\n"
        for i, p in zip(images.tolist(), products.tolist())
    )
    with raw.cursor() as copying:
        with copying.copy(
            "COPY catalog_product (id, merchant_id, sku, title, description, category, attributes, price, url, active,"
            " created_at, updated_at) FROM STDIN"
        ) as copy:
            copy.write(rows)
        with copying.copy(
            "COPY catalog_productimage (id, product_id, file, sha256, width, height, size_bytes, position, source_url,"
            " status, error, created_at, embed_attempts, embed_attempt_by) FROM STDIN"
        ) as copy:
            copy.write(files)
        copying.execute("TRUNCATE pad_embedding")
        with copying.copy(
            "COPY pad_embedding (id, image_id, product_id, model_version_id, code, fc7) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.write(_embedding_payload(embeddings, images, products, version, codes, fc7))
        copying.execute(
            "INSERT INTO catalog_imageembedding (id, image_id, product_id, model_version_id, code, fc7, category,"
            " attributes, landmarks, created_at) SELECT id, image_id, product_id, model_version_id, code, fc7, '',"
            " '{}', '[]', now() FROM pad_embedding"
        )


def _embedding_payload(embeddings, images, products, version, codes: np.ndarray, fc7: np.ndarray) -> bytes:
    """PostgreSQL binary COPY rows: int8 x4, varbit (bit length + bytes), pgvector (dim, unused, float4s)."""
    code_bytes, dim = codes.shape[1], fc7.shape[1]
    row_type = np.dtype(
        [
            ("fields", ">i2"),
            ("id_len", ">i4"), ("id", ">i8"),
            ("image_len", ">i4"), ("image", ">i8"),
            ("product_len", ">i4"), ("product", ">i8"),
            ("version_len", ">i4"), ("version", ">i8"),
            ("code_len", ">i4"), ("code_bits", ">i4"), ("code", np.uint8, (code_bytes,)),
            ("fc7_len", ">i4"), ("fc7_dim", ">i2"), ("fc7_unused", ">i2"), ("fc7", ">f4", (dim,)),
        ]
    )  # fmt: skip
    table = np.zeros(len(embeddings), row_type)
    table["fields"] = 6
    for name in ("id", "image", "product", "version"):
        table[f"{name}_len"] = 8
    table["id"], table["image"], table["product"], table["version"] = embeddings, images, products, version.pk
    table["code_len"], table["code_bits"], table["code"] = 4 + code_bytes, version.code_bits, codes
    table["fc7_len"], table["fc7_dim"], table["fc7"] = 4 + 4 * dim, dim, fc7
    header = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
    return header + table.tobytes() + (-1).to_bytes(2, "big", signed=True)
