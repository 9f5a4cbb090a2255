import numpy as np
import pytest

from catalog.codes import bits_to_bitstring, bitstring_pack, packed_bitstring
from workers.ml.codes import bit_balance, hamming_distances, pack_bits, select_shells


def test_pack_unpack_round_trip_and_big_endian_order():
    rng = np.random.default_rng(0)
    bits = rng.random((5, 64)) > 0.5
    codes = pack_bits(bits)
    assert codes.dtype == np.uint8 and codes.shape == (5, 8)
    assert np.array_equal(np.unpackbits(codes, axis=1).astype(bool), bits)
    first = np.zeros((1, 8), bool)
    first[0, 0] = True  # bit 0 is the most significant bit of byte 0
    assert pack_bits(first)[0, 0] == 0b1000_0000
    with pytest.raises(ValueError):
        pack_bits(np.zeros((1, 12), bool))


def test_packed_codes_and_the_catalogs_bit_text_agree_in_pgvector_order():
    """What a worker packs, the catalog writes as pgvector's bit text and reads back (catalog.codes)."""
    bits = np.array([1, 0, 1, 1, 0, 0, 0, 1] * 4, bool)
    text = bits_to_bitstring(bits)
    assert text == "10110001" * 4
    packed = pack_bits(bits[None])[0]
    assert packed_bitstring(packed, 32) == text
    assert np.array_equal(bitstring_pack(text), packed)


@pytest.mark.parametrize("code_bits", [32, 64, 72, 256])
def test_hamming_distance_matches_a_naive_count(code_bits):
    rng = np.random.default_rng(code_bits)
    a = rng.random((4, code_bits)) > 0.5
    b = rng.random((7, code_bits)) > 0.5
    expected = (a[:, None, :] != b[None, :, :]).sum(axis=2)
    assert np.array_equal(hamming_distances(pack_bits(a), pack_bits(b)), expected)


def test_shell_selection_takes_whole_ties():
    distances = np.array([5, 1, 3, 1, 3, 3, 9, 0])
    # min 3: shells 0 (1 item) and 1 (2 items) make 3 -> stop there.
    assert select_shells(distances, min_count=3).indices.tolist() == [7, 1, 3]
    # min 4: shell 3 has three members; all are taken, never a cut inside the tie.
    chosen = select_shells(distances, min_count=4)
    assert chosen.indices.tolist() == [7, 1, 3, 2, 4, 5] and chosen.radius == 3
    # max 5: the distance-3 shell would overflow to 6, so it is left out.
    assert select_shells(distances, min_count=4, max_count=5).indices.tolist() == [7, 1, 3]
    # a radius is a hard limit
    assert select_shells(distances, min_count=10, radius=1).indices.tolist() == [7, 1, 3]
    # a first shell larger than max_count is truncated rather than returning nothing
    assert len(select_shells(np.zeros(10, int), min_count=1, max_count=4).indices) == 4
    assert select_shells(distances, min_count=1, radius=-1).radius == -1


def test_bit_balance():
    balanced = np.array([[0, 1], [1, 0]], bool)
    assert bit_balance(balanced)["balance"] == 1.0 and bit_balance(balanced)["dead_bits"] == 0
    constant = np.ones((3, 4), bool)
    assert bit_balance(constant)["balance"] == 0.0 and bit_balance(constant)["dead_bits"] == 4
