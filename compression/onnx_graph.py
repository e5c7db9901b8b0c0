"""Building blocks of the ONNX export: a small graph builder and in-graph weight decoders.

The decoders are what keep a compressed model compressed inside the ``.onnx`` file:
each stores a weight in its compact form (codebook + indices, int8, sparse) as
initializers and adds the few nodes that rebuild the float32 tensor at load time.
ONNX Runtime folds these constant subgraphs once, when the session is created, so
inference runs on dense weights at full speed while the file stays small.

Decoders (all return the name of a float32 tensor, or int32 for ``unsigned_ints``):

- ``unsigned_ints``: unsigned integers of ``bits`` bits (1-16). 8- and 16-bit values
  are a uint8/uint16 initializer; other widths are stored as ``bits`` bit planes
  packed eight values a byte (``np.packbits``), decoded by BitShift + BitwiseAnd + a
  weighted ReduceSum.
- ``codebook_lookup``: ``Gather(codebook, indices)``, weight sharing.
- ``dequantize``: ``DequantizeLinear``, per tensor or per channel.
- ``scatter_positions``: zeros with values written at positions stored as packed
  relative indices (``CumSum`` then ``ScatterElements``), for pruned weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    """Collects nodes and initializers under unique names, then makes the ModelProto."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._names: set[str] = set()
        self.nbytes = 0  # bytes of initializer data so far: what each weight costs
        self._cache: dict[tuple[str, tuple[int, ...], bytes], str] = {}

    def fresh(self, hint: str) -> str:
        """``hint`` itself if unused, else ``hint_1``, ``hint_2``, ..."""
        name, i = hint, 0
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    def constant(self, array: Any, hint: str) -> str:
        """Add ``array`` (its dtype kept) as an initializer; returns its name."""
        name = self.fresh(hint)
        array = np.ascontiguousarray(array)
        self.nbytes += array.nbytes
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def cached(self, array: Any, hint: str) -> str:
        """A small constant, added once however often it is asked for (shifts, axes)."""
        array = np.ascontiguousarray(array)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._cache:
            self._cache[key] = self.constant(array, hint)
        return self._cache[key]

    def ints(self, values: Sequence[int], hint: str) -> str:
        """An int64 vector initializer (shapes, axes)."""
        return self.constant(np.asarray(values, dtype=np.int64), hint)

    def add(self, op: str, inputs: Sequence[str], hint: str, **attrs: Any) -> str:
        """Append one node with a single output named after ``hint``; returns the output."""
        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.fresh(f"{hint}/{op}"),
                                           **attrs))
        return out

    def rename(self, old: str, new: str) -> None:
        """Rename tensor ``old`` (e.g. the last node's output to the graph output name)."""
        if new in self._names:
            raise ValueError(f"tensor name {new!r} is already used in the graph")
        self._names.add(new)
        for node in self.nodes:
            node.input[:] = [new if n == old else n for n in node.input]
            node.output[:] = [new if n == old else n for n in node.output]

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], *,
              opset: int, ir_version: int, graph_name: str, doc: str,
              metadata: dict[str, str], producer_version: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, graph_name, inputs, outputs,
                                  initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  ir_version=ir_version, producer_name="distnet",
                                  producer_version=producer_version, doc_string=doc)
        helper.set_model_props(model, metadata)
        return model


# ---- packing ---------------------------------------------------------------------------

def min_bits(max_value: int) -> int:
    """The fewest bits (at least 1) that hold every integer in ``[0, max_value]``."""
    return max(1, int(max_value).bit_length())


def pack_bit_planes(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ints ``values`` (n,) < 2**bits <= 2**16 -> uint8 (bits, ceil(n/8), 1) planes.

    Plane ``p`` holds bit ``bits-1-p`` (most significant first) of every value, eight
    values a byte, first value in the high bit (``np.packbits`` order). The trailing
    axis of 1 lets the decoder broadcast against the eight shifts without a Reshape.
    """
    flat = np.asarray(values, dtype=np.uint16).ravel()
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint16)[:, None]
    planes = (flat[None, :] >> shifts) & 1
    return np.packbits(planes, axis=1)[:, :, None]


def unpack_bit_planes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """NumPy inverse of ``pack_bit_planes``: the first ``n`` values as int64."""
    planes = np.unpackbits(packed[:, :, 0], axis=1)[:, :n].astype(np.int64)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.int64))[:, None]
    return (planes * weights).sum(axis=0)


def unsigned_ints_nbytes(n: int, bits: int, packed: bool = True) -> int:
    """Bytes ``unsigned_ints`` stores for ``n`` values of ``bits`` bits."""
    if packed and bits not in (8, 16):
        return bits * ((n + 7) // 8)
    return n * (1 if bits <= 8 else 2)


# ---- decoders ---------------------------------------------------------------------------

def unsigned_ints(g: GraphBuilder, values: np.ndarray, bits: int, hint: str,
                  packed: bool = True) -> str:
    """Store unsigned ints ``values`` (n,) < 2**bits compactly; returns an int32 (n,) tensor.

    8 and 16 bits (or ``packed=False``: opsets before 18 lack BitwiseAnd) are stored
    as plain uint8/uint16, any other width as bit planes.
    """
    flat = np.asarray(values).ravel()
    if not 1 <= bits <= 16 or (flat.size and (flat.min() < 0 or flat.max() >= 1 << bits)):
        raise ValueError(f"{hint}: values must lie in [0, 2**{bits}) with 1 <= bits <= 16")
    if not packed or bits in (8, 16):
        stored = g.constant(flat.astype(np.uint8 if bits <= 8 else np.uint16), hint)
        return g.add("Cast", [stored], f"{hint}_int", to=TensorProto.INT32)
    n = flat.size
    packed = g.constant(pack_bit_planes(flat, bits), f"{hint}_packed{bits}")
    shifts = g.cached(np.arange(7, -1, -1, dtype=np.uint8), "bit_shifts")
    one = g.cached(np.ones(1, dtype=np.uint8), "one_u8")
    place = g.cached((1 << np.arange(bits - 1, -1, -1, dtype=np.int32))[:, None, None],
                     f"place_values{bits}")
    # (bits, m, 1) >> (8,) -> (bits, m, 8): bit j of byte i is value 8*i+j of the plane.
    bit = g.add("BitwiseAnd", [g.add("BitShift", [packed, shifts], f"{hint}_shift",
                                     direction="RIGHT"), one], f"{hint}_bits")
    weighted = g.add("Mul", [g.add("Cast", [bit], f"{hint}_bits32", to=TensorProto.INT32),
                             place], f"{hint}_weighted")
    summed = g.add("ReduceSum", [weighted, g.cached(np.zeros(1, np.int64), "axes0")],
                   f"{hint}_sum", keepdims=0)
    flat_out = g.add("Reshape", [summed, g.cached(np.array([-1], np.int64), "flat_shape")],
                     f"{hint}_padded")
    if n == 8 * ((n + 7) // 8):
        return flat_out
    return g.add("Slice", [flat_out, g.cached(np.zeros(1, np.int64), "axes0"),
                           g.ints([n], f"{hint}_count")], f"{hint}_int")


def codebook_lookup(g: GraphBuilder, codebook: np.ndarray, indices: str, hint: str) -> str:
    """``codebook[indices]``: float32 codebook (k,) initializer gathered by an int tensor."""
    book = g.constant(np.asarray(codebook, dtype=np.float32), f"{hint}_codebook")
    return g.add("Gather", [book, indices], hint, axis=0)


def dequantize(g: GraphBuilder, q: str, scale: np.ndarray, zero_point: np.ndarray,
               axis: int | None, hint: str) -> str:
    """``(q - zero_point) * scale`` by DequantizeLinear; per channel along ``axis`` if given.

    q: an int8/uint8 tensor; zero_point must have q's dtype.
    """
    inputs = [q, g.constant(np.asarray(scale, dtype=np.float32), f"{hint}_scale"),
              g.constant(zero_point, f"{hint}_zero_point")]
    attrs = {} if axis is None else {"axis": int(axis)}
    return g.add("DequantizeLinear", inputs, hint, **attrs)


def gap_symbols(positions: np.ndarray, bits: int) -> np.ndarray:
    """Sorted flat ``positions`` as relative indices of ``bits`` bits (Deep Compression).

    Symbol ``s < M = 2**bits - 1`` means "advance s + 1: a value is here"; ``s == M``
    means "advance M, no value" (a filler bridging a long gap), starting before
    position 0. The .dcz format uses the same convention. Returns int64 (m,).
    """
    limit = (1 << bits) - 1
    gaps = np.diff(np.asarray(positions, dtype=np.int64), prepend=-1)
    fillers = (gaps - 1) // limit
    out = np.full(gaps.size + int(fillers.sum()), limit, dtype=np.int64)
    out[np.cumsum(fillers + 1) - 1] = gaps - fillers * limit - 1
    return out


def positions_of(symbols: np.ndarray, bits: int) -> np.ndarray:
    """NumPy inverse of ``gap_symbols``."""
    limit = (1 << bits) - 1
    pos = np.cumsum(np.where(symbols == limit, limit, symbols + 1)) - 1
    return pos[symbols != limit]


def best_gap_bits(positions: np.ndarray, packed: bool = True) -> int:
    """The symbol width (1-16 bits) that stores ``positions`` in the fewest bytes."""
    widths = range(1, 17) if packed else (8, 16)
    return min(widths, key=lambda b: unsigned_ints_nbytes(gap_symbols(positions, b).size, b,
                                                          packed))


def scatter_positions(g: GraphBuilder, shape: tuple[int, ...], positions: np.ndarray,
                      values: str, hint: str, packed: bool = True) -> str:
    """A float32 tensor of ``shape``: zeros, with ``values`` (nnz,) at flat ``positions``.

    The positions are stored as ``gap_symbols`` in the narrowest width that pays and
    rebuilt by CumSum (fillers dropped by Compress); ``ConstantOfShape`` makes the
    zeros and ``ScatterElements`` writes the values, so nothing dense is stored.
    """
    bits = best_gap_bits(positions, packed)
    symbols = gap_symbols(positions, bits)
    sym = unsigned_ints(g, symbols, bits, f"{hint}_gaps", packed)
    one = g.cached(np.array(1, dtype=np.int32), "one_i32")
    step = g.add("Add", [sym, one], f"{hint}_steps")
    limit = (1 << bits) - 1
    filler = None
    if np.any(symbols == limit):
        top = g.cached(np.array(limit, dtype=np.int32), f"gap_limit{bits}")
        filler = g.add("Equal", [sym, top], f"{hint}_fillers")
        step = g.add("Where", [filler, top, step], f"{hint}_steps_filled")
    ends = g.add("CumSum", [step, g.cached(np.array(0, dtype=np.int32), "axis0_i32")],
                 f"{hint}_ends")
    pos = g.add("Sub", [ends, one], f"{hint}_positions")
    if filler is not None:
        kept = g.add("Not", [filler], f"{hint}_kept")
        pos = g.add("Compress", [pos, kept], f"{hint}_positions_kept", axis=0)
    size = int(np.prod(shape, dtype=np.int64))
    zeros = g.add("ConstantOfShape", [g.ints([size], f"{hint}_size")], f"{hint}_zeros",
                  value=numpy_helper.from_array(np.zeros(1, dtype=np.float32)))
    flat = g.add("ScatterElements", [zeros, pos, values], f"{hint}_flat", axis=0)
    return g.add("Reshape", [flat, g.ints(shape, f"{hint}_shape")], hint)
