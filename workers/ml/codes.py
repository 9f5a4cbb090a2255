"""Binary codes: packing, the reference Hamming distance and tie-aware top-k.

Bit order: codes are packed with `np.packbits(bits, axis=1)` (numpy's default, big-endian): bit 0 of a code
is the most significant bit of byte 0. pgvector's `bit` type and its text form ('0101...') use the same order,
so the packed bytes and the text catalog.codes writes and reads describe the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.encoder import pack_bits as pack_bits  # what the Encoder packs its bits with


def _as_words(codes: np.ndarray) -> np.ndarray:
    """View packed uint8 codes as uint64 words when the width allows: 8x fewer popcounts."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.shape[1] % 8 == 0:
        return codes.view(np.uint64)
    return codes


def hamming_distances(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Packed codes (Q, B/8) and (N, B/8) uint8 -> (Q, N) int32 Hamming distances (reference implementation)."""
    q = _as_words(np.atleast_2d(queries))
    db = _as_words(np.atleast_2d(database))
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"code widths differ: {q.shape[1]} vs {db.shape[1]} words")
    out = np.empty((q.shape[0], db.shape[0]), dtype=np.int32)
    for i, row in enumerate(q):
        out[i] = np.bitwise_count(np.bitwise_xor(db, row)).sum(axis=1, dtype=np.int32)
    return out


@dataclass(frozen=True)
class ShellSelection:
    """Candidates of one query: whole Hamming shells, nearest first."""

    indices: np.ndarray  # (M,) int64 database rows, sorted by distance then row
    distances: np.ndarray  # (M,) int32
    radius: int  # largest distance taken (-1 when nothing was taken)


def select_shells(
    distances: np.ndarray,
    *,
    min_count: int,
    max_count: int | None = None,
    radius: int | None = None,
) -> ShellSelection:
    """Tie-aware candidate set for one query's (N,) Hamming distances.

    Takes whole shells (every item at distance r) in increasing r until at least `min_count` items are taken;
    never a cut inside a tie. A shell that would push the total past `max_count` is not taken, unless nothing
    has been taken yet (then the first shell is truncated: some candidates beat none). `radius`, if given, is a
    hard limit on the distance of anything taken.
    """
    distances = np.asarray(distances)
    order = np.argsort(distances, kind="stable")
    sorted_d = distances[order]
    if radius is not None:
        keep = np.searchsorted(sorted_d, radius, side="right")
        order, sorted_d = order[:keep], sorted_d[:keep]
    if len(order) == 0:
        return ShellSelection(order.astype(np.int64), sorted_d.astype(np.int32), -1)
    shell_ends = np.flatnonzero(np.diff(sorted_d)) + 1
    shell_ends = np.append(shell_ends, len(sorted_d))
    taken = 0
    for end in shell_ends:
        if max_count is not None and end > max_count:
            if taken == 0:
                taken = max_count
            break
        taken = int(end)
        if taken >= min_count:
            break
    indices = order[:taken].astype(np.int64)
    chosen = sorted_d[:taken].astype(np.int32)
    return ShellSelection(indices, chosen, int(chosen[-1]) if taken else -1)


def bit_balance(bits: np.ndarray) -> dict[str, float]:
    """How evenly bits are used: per-bit mean activation and its spread; 0.5 everywhere is ideal."""
    means = np.asarray(bits, dtype=np.float64).mean(axis=0)
    return {
        "mean": float(means.mean()),
        "min": float(means.min()),
        "max": float(means.max()),
        # 1 - mean |p - 0.5| * 2: 1.0 = every bit on for exactly half the images, 0.0 = constant bits.
        "balance": float(1 - np.abs(means - 0.5).mean() * 2),
        "dead_bits": int(((means < 0.01) | (means > 0.99)).sum()),
    }
