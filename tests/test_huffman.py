"""Canonical Huffman coding and fixed-width packing: round trips, optimality, limits, speed."""

import heapq
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from compression import huffman


def optimal_bits(counts):
    """Total bits of an optimal prefix code: the sum of all merge weights (independent check)."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a + b
        heapq.heappush(heap, a + b)
    return total


def roundtrip(symbols, alphabet=None):
    enc = huffman.encode(np.asarray(symbols, dtype=np.int64), alphabet)
    out = huffman.decode(enc.data, enc.count, enc.lengths, enc.nbits)
    np.testing.assert_array_equal(out, symbols)
    assert len(enc.data) == -(-enc.nbits // 8)
    return enc


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=600))
def test_roundtrip_random(symbols):
    roundtrip(symbols)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=80))
def test_lengths_are_optimal_and_prefix_free(counts):
    counts = np.array(counts)
    lengths = huffman.code_lengths(counts, max_bits=32)
    assert huffman.coded_bits(counts, lengths) == optimal_bits(counts)
    codes = huffman.canonical_codes(lengths)
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths, strict=True) if n]
    for a in words:
        assert sum(b.startswith(a) for b in words) == 1  # only itself


@pytest.mark.parametrize("symbols", [
    [], [0], [7] * 1000, list(range(256)), [3] * 9_990 + list(range(10)),
    list(np.random.default_rng(1).integers(0, 2, 5_000)),
], ids=["empty", "one", "single-symbol", "all-distinct", "skewed", "binary"])
def test_roundtrip_edge_cases(symbols):
    enc = roundtrip(symbols, alphabet=max(symbols, default=0) + 1)
    if symbols and len(set(symbols)) == 1:
        assert enc.nbits == len(symbols)  # one bit each: the decoder must count them


def test_length_limit_keeps_a_prefix_code():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    free = huffman.code_lengths(counts, max_bits=64)
    assert free.max() > 16  # the unlimited code would need a huge decode table
    limited = huffman.code_lengths(counts, max_bits=16)
    assert limited.max() == 16
    assert np.sum(2.0 ** -limited.astype(float)) <= 1.0
    symbols = np.repeat(np.arange(40), np.minimum(counts, 50))
    enc = huffman.encode(symbols, lengths=limited)
    np.testing.assert_array_equal(huffman.decode(enc.data, enc.count, limited, enc.nbits),
                                  symbols)


def test_skewed_stream_is_short():
    rng = np.random.default_rng(0)
    symbols = (rng.random(100_000) < 0.02).astype(np.int64)  # entropy about 0.14 bit
    enc = roundtrip(symbols, 2)
    assert enc.nbits == len(symbols)  # two symbols: Huffman cannot go below 1 bit...
    gaps = rng.geometric(0.3, 50_000).clip(max=31) - 1
    enc = roundtrip(gaps, 32)
    assert enc.nbits / len(gaps) < 3.0  # ...but a geometric source codes well below 5 bits


def test_decode_300k_symbols_fast():
    rng = np.random.default_rng(0)
    symbols = np.minimum(rng.geometric(0.25, 300_000), 32) - 1
    enc = huffman.encode(symbols, 32)
    t0 = time.perf_counter()
    out = huffman.decode(enc.data, enc.count, enc.lengths, enc.nbits)
    elapsed = time.perf_counter() - t0
    np.testing.assert_array_equal(out, symbols)
    assert elapsed < 1.0, f"decoding 300k symbols took {elapsed:.2f} s"


def test_corrupt_streams_are_refused():
    symbols = np.random.default_rng(2).integers(0, 5, 1000)
    enc = huffman.encode(symbols, 5)
    with pytest.raises(ValueError, match="too short|length mismatch"):
        huffman.decode(enc.data[: len(enc.data) // 2], enc.count, enc.lengths)
    with pytest.raises(ValueError, match="stream holds"):
        huffman.decode(enc.data, enc.count, enc.lengths, enc.nbits + 64)
    with pytest.raises(ValueError, match="no code"):
        huffman.encode(np.array([0, 1, 2]), lengths=np.array([1, 1, 0], np.uint8))
    incomplete = np.array([2, 2, 2, 0], np.uint8)  # code 11 is unused: a pattern with no code
    with pytest.raises(ValueError, match="no code|too short|mismatch"):
        huffman.decode(b"\xff\xff", 8, incomplete, 16)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="non-negative"):
        huffman.encode(np.array([-1, 2]))
    with pytest.raises(ValueError, match="outside the alphabet"):
        huffman.encode(np.array([5]), alphabet=3)
    with pytest.raises(ValueError, match="Kraft"):
        huffman.canonical_codes(np.array([1, 1, 1]))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 16), st.lists(st.integers(0, 2**16 - 1), max_size=300))
def test_fixed_width_roundtrip(width, values):
    values = np.array(values, dtype=np.int64) % (2**width)
    data = huffman.pack_uint(values, width)
    assert len(data) == -(-len(values) * width // 8)
    np.testing.assert_array_equal(huffman.unpack_uint(data, len(values), width), values)
