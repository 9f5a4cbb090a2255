"""A model version's binary codes in PostgreSQL: the one definition of how SQL reads them and how they are indexed.

Codes are stored unsized (`bit varying`) because versions differ in code length. pgvector indexes such a column
only through an expression with a fixed length, so each version gets its own partial HNSW index on
`code::bit(B) WHERE model_version_id = v` (`code_index_create_sql`). The planner uses that index only for a query
written with the same expression and the same literal version id, which is why every query on codes builds its
SQL from `code_sql` and `version_sql` here instead of spelling the cast out itself.

Also pgvector's bit text ('0101...'), the form codes travel in, to and from numpy.
"""

from __future__ import annotations

import numpy as np

EMBEDDING_TABLE = "catalog_imageembedding"


def code_sql(column: str, code_bits: int) -> str:
    """`column::bit(B)`: a code column (or a `%s` placeholder) at the version's fixed length."""
    return f"{column}::bit({int(code_bits)})"


def version_sql(alias: str, version_id: int) -> str:
    """`alias.model_version_id = v` with v a literal, as the partial index's predicate needs."""
    prefix = f"{alias}." if alias else ""
    return f"{prefix}model_version_id = {int(version_id)}"


def code_index_name(*, version_id: int) -> str:
    return f"catalog_embedding_code_hnsw_v{int(version_id)}"


def code_index_create_sql(*, version_id: int, code_bits: int) -> str:
    """The version's HNSW index on its codes (bit_hamming_ops), unless it exists."""
    return (
        f"CREATE INDEX IF NOT EXISTS {code_index_name(version_id=version_id)} ON {EMBEDDING_TABLE} "
        f"USING hnsw (({code_sql('code', code_bits)}) bit_hamming_ops) WHERE {version_sql('', version_id)}"
    )


def bits_to_bitstring(bits: np.ndarray) -> str:
    """0/1 (or bool) bits -> pgvector's bit text."""
    return "".join("1" if bit else "0" for bit in np.asarray(bits, dtype=bool).reshape(-1))


def bitstring_pack(text: str) -> np.ndarray:
    """pgvector's bit text ('0101...') -> packed uint8 bytes, bit 0 = most significant bit of byte 0 (its order)."""
    bits = np.frombuffer(text.encode("ascii"), dtype=np.uint8) == ord("1")
    return np.packbits(bits)


def packed_bitstring(code: np.ndarray, code_bits: int) -> str:
    """Packed uint8 bytes -> pgvector's bit text of the version's length."""
    return bits_to_bitstring(np.unpackbits(np.asarray(code, dtype=np.uint8))[:code_bits])
