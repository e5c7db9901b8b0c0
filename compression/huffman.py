"""Canonical Huffman coding of small-alphabet integer streams (Deep Compression, stage 3).

Symbols are integers ``0 .. A-1`` (cluster indices, or the relative indices of a
sparse layout). A code is described by its *code lengths* alone (one ``uint8`` per
symbol, 0 for unused symbols): the canonical assignment rebuilds the codes from the
lengths, so a file stores ``A`` bytes of lengths instead of a tree.

Encoding is vectorised (one NumPy pass per bit of the longest code). Decoding is
table driven: a lookup table of ``2 ** max_len`` entries maps the next ``max_len``
bits at *every* bit position to (symbol, length) at once; finding which positions
actually start a code is a pointer chase, done in blocks with pointer doubling so
that Python touches only one position in ``BLOCK``. Codes are limited to
``MAX_BITS`` bits so the table stays small.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

MAX_BITS = 16  # longest code allowed: the decode table has 2**16 entries at most
BLOCK = 64  # symbols decoded per vectorised step of the pointer chase


def code_lengths(counts: np.ndarray, max_bits: int = MAX_BITS) -> np.ndarray:
    """Huffman code lengths for symbol frequencies ``counts`` (A,) -> (A,) uint8.

    Unused symbols (count 0) get length 0. A single used symbol gets length 1 (a
    decoder needs at least one bit per symbol to count them). Lengths longer than
    ``max_bits`` are limited with the Kraft-sum repair used by zlib-style coders:
    clamp, then lengthen the shortest-but-least-likely codes until the Kraft sum is
    back to at most 1; the result stays a valid prefix code, near-optimal.
    """
    counts = np.asarray(counts, dtype=np.int64).ravel()
    if counts.size and counts.min() < 0:
        raise ValueError("symbol counts must be non-negative")
    used = np.flatnonzero(counts)
    lengths = np.zeros(counts.size, dtype=np.int64)
    if used.size == 0:
        return lengths.astype(np.uint8)
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths.astype(np.uint8)
    if used.size > 2**max_bits:
        raise ValueError(f"{used.size} symbols cannot be coded in {max_bits} bits")
    # Heap of (weight, tie-breaker, members); merging adds one bit to every member.
    heap = [(int(counts[s]), int(s), [int(s)]) for s in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        w1, t1, m1 = heapq.heappop(heap)
        w2, t2, m2 = heapq.heappop(heap)
        members = m1 + m2
        lengths[members] += 1
        heapq.heappush(heap, (w1 + w2, min(t1, t2), members))
    if lengths.max() > max_bits:
        lengths = _limit_lengths(lengths, counts, max_bits)
    return lengths.astype(np.uint8)


def _limit_lengths(lengths: np.ndarray, counts: np.ndarray, max_bits: int) -> np.ndarray:
    lengths = lengths.copy()
    used = lengths > 0
    lengths[used] = np.minimum(lengths[used], max_bits)
    # Kraft sum in units of 2**-max_bits; a prefix code needs it <= 2**max_bits.
    kraft = int((2.0 ** (max_bits - lengths[used])).sum())
    order = np.argsort(-counts, kind="stable")  # most frequent first
    while kraft > 2**max_bits:
        # Lengthen the least frequent code that is still shorter than the limit.
        for s in order[::-1]:
            if 0 < lengths[s] < max_bits:
                kraft -= 2 ** (max_bits - lengths[s] - 1)
                lengths[s] += 1
                break
    # Spend any slack left on the most frequent symbols (shorten while it still fits).
    for s in order:
        while lengths[s] > 1 and kraft + 2 ** (max_bits - lengths[s]) <= 2**max_bits:
            kraft += 2 ** (max_bits - lengths[s])
            lengths[s] -= 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (A,) int64 from code lengths: sorted by (length, symbol), counting up."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    code, prev = 0, 0
    for s in np.lexsort((np.arange(lengths.size), lengths)):
        n = int(lengths[s])
        if n == 0:
            continue
        code <<= n - prev
        codes[s] = code
        code += 1
        prev = n
    if prev and code > 2**prev:
        raise ValueError("code lengths violate the Kraft inequality: not a prefix code")
    return codes


@dataclass
class Encoded:
    """A Huffman-coded stream: packed bits, their exact count, symbol count and lengths."""

    data: bytes
    nbits: int
    count: int
    lengths: np.ndarray  # (A,) uint8

    @property
    def nbytes(self) -> int:
        return len(self.data)


def encode(symbols: np.ndarray, alphabet: int | None = None,
           lengths: np.ndarray | None = None, max_bits: int = MAX_BITS) -> Encoded:
    """Huffman-code ``symbols`` (n,) of non-negative ints; returns the packed stream.

    ``alphabet`` fixes the number of symbols (default: max + 1); ``lengths`` reuses a
    given code (every symbol present must have a nonzero length).
    """
    sym = np.asarray(symbols).ravel()
    if sym.size and (not np.issubdtype(sym.dtype, np.integer) or sym.min() < 0):
        raise ValueError("symbols must be non-negative integers")
    sym = sym.astype(np.int64, copy=False)
    size = int(alphabet if alphabet is not None else (sym.max() + 1 if sym.size else 0))
    if sym.size and sym.max() >= size:
        raise ValueError(f"symbol {int(sym.max())} outside the alphabet of {size}")
    if lengths is None:
        lengths = code_lengths(np.bincount(sym, minlength=size), max_bits)
    lengths = np.asarray(lengths, dtype=np.uint8)
    if sym.size == 0:
        return Encoded(b"", 0, 0, lengths)
    lens = lengths.astype(np.int64)[sym]
    if lens.min() == 0:
        raise ValueError("a symbol present in the data has no code")
    codes = canonical_codes(lengths)[sym]
    ends = np.cumsum(lens)
    starts = ends - lens
    nbits = int(ends[-1])
    bits = np.zeros(nbits, dtype=np.uint8)
    for j in range(int(lens.max())):  # bit j (from the left) of every code that long
        has = lens > j
        bits[starts[has] + j] = (codes[has] >> (lens[has] - 1 - j)) & 1
    return Encoded(np.packbits(bits).tobytes(), nbits, int(sym.size), lengths)


def decode(data: bytes, count: int, lengths: np.ndarray, nbits: int | None = None) -> np.ndarray:
    """Decode ``count`` symbols from a packed stream made by ``encode`` -> (count,) int64.

    Raises ValueError when the stream is too short, contains a bit pattern that is
    no code, or (given ``nbits``) does not end exactly where the last code ends.
    """
    if count < 0:
        raise ValueError(f"negative symbol count {count}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0 or lengths.max() == 0:
        raise ValueError("empty Huffman code for a non-empty stream")
    width = int(lengths.max())
    if width > 24 - 7:  # the window is read from 3 bytes at any bit offset
        raise ValueError(f"code length {width} exceeds the decoder's limit of 17 bits")
    codes = canonical_codes(lengths)
    # Table: every width-bit window that starts with a code -> that code's symbol and length.
    sym_table = np.full(2**width, -1, dtype=np.int32)
    len_table = np.zeros(2**width, dtype=np.int32)
    for s in np.flatnonzero(lengths):
        n = int(lengths[s])
        lo = int(codes[s]) << (width - n)
        sym_table[lo : lo + (1 << (width - n))] = s
        len_table[lo : lo + (1 << (width - n))] = n
    raw = np.frombuffer(data, dtype=np.uint8)
    total = raw.size * 8 if nbits is None else int(nbits)
    if total > raw.size * 8 or total >= 2**31 - 2:
        raise ValueError(f"stream holds {raw.size * 8} bits, header says {total}")
    # int32 throughout: the arrays are as long as the stream is in bits.
    if count > total:  # every code takes at least one bit
        raise ValueError(f"{count} symbols cannot fit in {total} bits: stream too short")
    padded = np.concatenate([raw, np.zeros(3, dtype=np.uint8)]).astype(np.int32)
    pos = np.arange(total, dtype=np.int32)
    byte, shift = pos >> 3, pos & 7
    word = (padded[byte] << 16) | (padded[byte + 1] << 8) | padded[byte + 2]
    window = (word >> (24 - width - shift)) & ((1 << width) - 1)
    step = len_table[window]  # code length starting at each bit position (0: no code)
    symbol_at = sym_table[window]
    # nxt[p]: position after the code at p. Position `total` (the end) and
    # `total + 1` (no code here, or a code running past the end) are sinks.
    nxt = np.empty(total + 2, dtype=np.int32)
    np.add(pos, step, out=nxt[:total])
    nxt[:total][(step == 0) | (nxt[:total] > total)] = total + 1
    nxt[total:] = (total, total + 1)
    # Positions of every BLOCK-th code by pointer doubling, then BLOCK vector steps.
    jump = nxt
    hop = 1
    while hop < BLOCK:
        jump = jump[jump]
        hop *= 2
    nblocks = -(-count // BLOCK)
    starts = np.empty(nblocks, dtype=np.int32)
    p = 0
    for b in range(nblocks):
        starts[b] = p
        p = jump[p]
    positions = np.empty((BLOCK, nblocks), dtype=np.int32)
    cur = starts
    for j in range(BLOCK):
        positions[j] = cur
        cur = nxt[cur]
    positions = positions.T.ravel()[:count]
    if positions.max() >= total:
        raise ValueError(f"Huffman stream too short or corrupt: fewer than {count} codes")
    out = symbol_at[positions].astype(np.int64)
    if out.min() < 0:
        raise ValueError("Huffman stream corrupt: a bit pattern matches no code")
    end = int(positions[-1] + step[positions[-1]])
    if end > total or (nbits is not None and end != total):
        raise ValueError(f"Huffman stream length mismatch: codes end at bit {end}, "
                         f"stream has {total}")
    return out


def coded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Bits that symbols with frequencies ``counts`` take under code ``lengths``."""
    counts = np.asarray(counts, dtype=np.int64)
    return int((counts * np.asarray(lengths, dtype=np.int64)[: counts.size]).sum())


def pack_uint(values: np.ndarray, width: int) -> bytes:
    """Fixed-width packing: ``values`` (n,) ints in [0, 2**width) -> ceil(n*width/8) bytes."""
    v = np.asarray(values, dtype=np.int64).ravel()
    if v.size and (v.min() < 0 or v.max() >= 2**width):
        raise ValueError(f"values do not fit in {width} bits")
    if width == 0 or v.size == 0:
        return b""
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return np.packbits(((v[:, None] >> shifts) & 1).astype(np.uint8)).tobytes()


def unpack_uint(data: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of ``pack_uint`` -> (count,) int64; ValueError when ``data`` is too short."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    need = -(-count * width // 8)
    if len(data) < need:
        raise ValueError(f"fixed-width stream too short: {len(data)} bytes, need {need}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * width)
    weights = (1 << np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits.reshape(count, width).astype(np.int64) @ weights
