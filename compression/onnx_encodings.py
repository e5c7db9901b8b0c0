"""Compressed forms of a weight that the ONNX export keeps compressed in the file.

These types are the export's whole interface to compression: the pipeline turns its
own results (codebooks, int8 tensors, pruning masks) into them, keyed by parameter
name, and ``export_onnx(..., weight_encodings=...)`` stores each in its compact form
with the nodes that decode it (``emit``). Each type's ``decode()`` is the NumPy
reference of what the graph computes.

- ``Shared(codebook, indices, bits=None)``: weight sharing, ``codebook[indices]``.
- ``Int8(q, scale, zero_point=0, axis=None)``: ``(q - zero_point) * scale``.
- ``Sparse(shape, indices, values)``: zeros but ``values`` at flat ``indices``; values
  are float32 or a ``Shared``/per-tensor ``Int8`` of the non-zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import helper

from compression import onnx_graph as og
from distnet import backend
from distnet.nn.module import Module


@dataclass(frozen=True)
class Shared:
    """Weight sharing: ``weight = codebook[indices]``.

    codebook: (k,) float32, k <= 65536. indices: unsigned ints (uint8 for k <= 256) of
    the weight's shape, or (nnz,) as the values of a ``Sparse``. bits: the stored index
    width, default the fewest bits that hold ``k - 1`` (5 for 32 clusters); widths
    other than 8 and 16 are bit-packed in the file.
    """

    codebook: np.ndarray
    indices: np.ndarray
    bits: int | None = None

    def __post_init__(self) -> None:
        book = np.asarray(self.codebook, dtype=np.float32).ravel()
        idx = np.asarray(self.indices)
        if not 1 <= book.size <= 1 << 16:
            raise ValueError(f"Shared: codebook must have 1 to 65536 entries, got {book.size}")
        if idx.dtype.kind not in "ui" or (idx.size and (idx.min() < 0 or idx.max() >= book.size)):
            raise ValueError(f"Shared: indices must be integers in [0, {book.size})")
        bits = og.min_bits(book.size - 1) if self.bits is None else int(self.bits)
        if not og.min_bits(book.size - 1) <= bits <= 16:
            raise ValueError(f"Shared: bits={self.bits} cannot index {book.size} entries")
        object.__setattr__(self, "codebook", book)
        object.__setattr__(self, "indices", idx.astype(np.uint8 if bits <= 8 else np.uint16))
        object.__setattr__(self, "bits", bits)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.indices.shape)

    def decode(self) -> np.ndarray:
        return self.codebook[self.indices]

    def describe(self) -> str:
        return f"shared {self.bits}-bit ({self.codebook.size} values)"


@dataclass(frozen=True)
class Int8:
    """Linear quantisation: ``weight = (q - zero_point) * scale``.

    q: int8 (or uint8) array of the weight's shape. scale: float32 scalar, or (C,)
    with ``axis`` the channel axis (0 = output channels of Linear/Conv2d weights).
    zero_point: scalar or (C,), stored with q's dtype. Codes spanning fewer than 256
    values (2-7 bit quantisation) are bit-packed in the file.
    """

    q: np.ndarray
    scale: Any
    zero_point: Any = 0
    axis: int | None = None

    def __post_init__(self) -> None:
        q = np.asarray(self.q)
        if q.dtype not in (np.int8, np.uint8):
            raise ValueError(f"Int8: q must be int8 or uint8, got {q.dtype}")
        scale = np.asarray(self.scale, dtype=np.float32)
        zp = np.asarray(self.zero_point).astype(q.dtype)
        want = () if self.axis is None else (q.shape[self.axis],)
        if zp.ndim == 0:  # one zero point for every channel (0 for symmetric quantisation)
            zp = np.full(want, zp, dtype=q.dtype)
        if scale.shape != want or zp.shape != want:
            raise ValueError(f"Int8: scale {scale.shape} and zero_point {zp.shape} must have "
                             f"shape {want} (axis={self.axis}, q {q.shape})")
        object.__setattr__(self, "q", q)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "zero_point", zp)

    @classmethod
    def from_codes(cls, codes: Any, scale: Any, zero_point: Any) -> Int8:
        """From integer codes with ``scale``/``zero_point`` of size 1 (per tensor) or C (per
        output channel, axis 0), e.g. a linear quantiser's result; codes must fit int8 or
        uint8 (2-8 bit quantisation)."""
        codes, scale = np.asarray(codes), np.asarray(scale, dtype=np.float32).ravel()
        zp = np.asarray(zero_point).ravel()
        low, high = min(int(codes.min()), int(zp.min())), max(int(codes.max()), int(zp.max()))
        dtype = np.int8 if -128 <= low and high <= 127 else np.uint8
        if dtype == np.uint8 and (low < 0 or high > 255):
            raise ValueError(f"Int8.from_codes: codes span [{low}, {high}], more than 8 bits")
        if scale.size == 1:
            return cls(codes.astype(dtype), scale[0], zp[0].astype(dtype))
        return cls(codes.astype(dtype), scale, zp.astype(dtype), axis=0)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    def decode(self) -> np.ndarray:
        bshape = [1] * self.q.ndim
        if self.axis is not None:
            bshape[self.axis] = -1
        zp = self.zero_point.astype(np.float32).reshape(bshape)
        return (self.q.astype(np.float32) - zp) * self.scale.reshape(bshape)

    def describe(self) -> str:
        return "int8 " + ("per-tensor" if self.axis is None else f"per-channel (axis {self.axis})")


@dataclass(frozen=True)
class Sparse:
    """A pruned weight: zeros except ``values`` at flat (C-order) ``indices``.

    shape: the weight's shape. indices: (nnz,) ints, strictly increasing.
    values: (nnz,) float32, or a ``Shared``/per-tensor ``Int8`` of shape (nnz,).
    """

    shape: tuple[int, ...]
    indices: np.ndarray
    values: Any

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        idx = np.asarray(self.indices, dtype=np.int64).ravel()
        values = self.values
        if not isinstance(values, (Shared, Int8)):
            values = np.asarray(values, dtype=np.float32).ravel()
        elif isinstance(values, Int8) and values.axis is not None:
            raise ValueError("Sparse: Int8 values must be quantised per tensor (axis=None)")
        if tuple(values.shape) != idx.shape:
            raise ValueError(f"Sparse: {idx.size} indices but values of shape {values.shape}")
        size = int(np.prod(shape, dtype=np.int64))
        if idx.size and (idx[0] < 0 or idx[-1] >= size or np.any(np.diff(idx) <= 0)):
            raise ValueError(f"Sparse: indices must be strictly increasing in [0, {size})")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "values", values)

    @classmethod
    def from_dense(cls, weight: np.ndarray, mask: np.ndarray | None = None) -> Sparse:
        """The non-zeros of ``weight`` (or its entries where ``mask`` is set)."""
        w = np.asarray(weight, dtype=np.float32)
        idx = np.flatnonzero(w if mask is None else np.asarray(mask))
        return cls(w.shape, idx, w.ravel()[idx])

    def decode(self) -> np.ndarray:
        out = np.zeros(int(np.prod(self.shape, dtype=np.int64)), dtype=np.float32)
        vals = self.values
        out[self.indices] = vals if isinstance(vals, np.ndarray) else vals.decode()
        return out.reshape(self.shape)

    def describe(self) -> str:
        density = self.indices.size / max(1, int(np.prod(self.shape)))
        inner = ("" if isinstance(self.values, np.ndarray)
                 else f", values {self.values.describe()}")
        return f"sparse {100 * density:.1f}%{inner}"


Encoding = Shared | Int8 | Sparse


def stored_nbytes(enc: Encoding, opset: int = 18) -> int:
    """Bytes of initializer data that ``enc`` takes in an export."""
    g = og.GraphBuilder()
    emit(g, enc, "w", opset)
    return g.nbytes


def encodings_from_model(model: Module, opset: int = 18) -> dict[str, Encoding]:
    """The smallest lossless encoding of each parameter, found from its values alone.

    Zeros (pruned weights) make a ``Sparse``; values on a per-channel or per-tensor
    affine grid (linear quantisation) an ``Int8``; few distinct values (weight sharing)
    a ``Shared`` codebook; sparsity combines with the per-tensor forms. A parameter whose
    plain float32 form is smallest is left out. Every encoding decodes bit for bit to
    the parameter, so this recovers a compressed model's structure whatever produced
    it (a .dcz, a pruned, quantised or weight-shared checkpoint).
    """
    out: dict[str, Encoding] = {}
    for name, p in model.named_parameters():
        w = np.asarray(backend.to_host(p.data), dtype=np.float32)
        flat = w.ravel()
        nonzero = np.flatnonzero(flat)
        candidates: list[Encoding] = []
        if nonzero.size < flat.size:
            candidates.append(Sparse(w.shape, nonzero, flat[nonzero]))
        if w.ndim > 1 and w.shape[0] > 1:  # per output channel: many distinct values in all
            grid_c = _affine_grid(w.reshape(w.shape[0], -1))
            if grid_c is not None:
                candidates.append(Int8(grid_c[0].reshape(w.shape), *grid_c[1:], axis=0))
        for idx, values in ((None, flat), (nonzero, flat[nonzero])):
            book, labels = np.unique(values, return_inverse=True)
            if not 0 < book.size <= min(1 << 16, values.size // 2):
                continue  # too many distinct values for a codebook or a grid to pay
            shared = Shared(book, labels.astype(np.uint8 if book.size <= 256 else np.uint16))
            grid = _affine_grid(values[None, :]) if book.size <= 256 else None
            if idx is None:
                candidates.append(Shared(book, shared.indices.reshape(w.shape), shared.bits))
                if grid is not None:
                    candidates.append(Int8(grid[0].reshape(w.shape), grid[1][0], grid[2][0]))
            else:
                candidates.append(Sparse(w.shape, idx, shared))
                if grid is not None:
                    candidates.append(Sparse(w.shape, idx, Int8(grid[0][0], grid[1][0],
                                                                grid[2][0])))
        sizes = [stored_nbytes(c, opset) for c in candidates]
        if sizes and min(sizes) < w.nbytes:
            out[name] = candidates[int(np.argmin(sizes))]
    return out


def _affine_grid(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(q int8, scale (R,) float32, zero_point (R,) int8)`` with ``float32(q - zp) * scale``
    equal bit for bit to each row of ``rows`` (R, n), or None when some row is not on
    such a grid. The step is the smallest gap between a row's distinct values (or a
    half, third, quarter of it), refined by the largest value's multiple of it; the
    scale is the float32 (or a neighbour) that then reproduces every value exactly.
    """
    q = np.empty(rows.shape, dtype=np.int8)
    scales, zps = np.ones(rows.shape[0], np.float32), np.zeros(rows.shape[0], np.int8)
    for r, v in enumerate(rows):
        u = np.unique(v)
        if u.size > 256:
            return None
        if not np.any(u):
            q[r] = 0
            continue
        step = float(np.min(np.diff(u))) if u.size > 1 else float(np.abs(u).max())
        found = None
        u64 = u.astype(np.float64)
        for div in (1, 2, 3, 4):
            n = np.rint(u64 * div / step)
            top = int(np.argmax(np.abs(n)))
            if n[top] == 0:
                continue
            unit = u64[top] / n[top]  # far more precise than a difference of nearby values
            n = np.rint(u64 / unit)
            if np.abs(u64 / unit - n).max() > 1e-2 or n.max() - n.min() > 255:
                continue
            guess = np.float32(unit)
            for scale in (guess, np.nextafter(guess, np.float32(np.inf)),
                          np.nextafter(guess, np.float32(-np.inf))):
                if np.array_equal(n.astype(np.float32) * scale, u):
                    found = n.astype(np.int64), np.float32(scale)
                    break
            if found:
                break
        if found is None:
            return None
        n, scale = found
        zp = int(np.clip(-128 - n.min(), -128, 127)) if n.min() < -128 or n.max() > 127 else 0
        if n.min() + zp < -128 or n.max() + zp > 127:
            return None
        q[r] = (n[np.searchsorted(u, v)] + zp).astype(np.int8)
        scales[r], zps[r] = scale, zp
    return q, scales, zps


# ---- in the graph ---------------------------------------------------------------------------

def emit(g: og.GraphBuilder, enc: Encoding, hint: str, opset: int) -> str:
    """Add ``enc``'s stored form and the nodes that decode it; returns the float tensor."""
    packed = opset >= 18  # bit planes are decoded with BitwiseAnd, new in opset 18
    if isinstance(enc, Int8):
        low = int(enc.q.min()) if enc.q.size else 0
        bits = og.min_bits(int(enc.q.max()) - low) if enc.q.size else 8
        if not packed or bits >= 8:
            q = g.constant(enc.q, f"{hint}_q")
        else:  # 2-7 bit codes: store q - min in `bits` bits, rebuild q in the graph
            codes = og.unsigned_ints(g, enc.q.astype(np.int32).ravel() - low, bits,
                                     f"{hint}_codes")
            shifted = g.add("Add", [codes, g.constant(np.array(low, np.int32), f"{hint}_low")],
                            f"{hint}_q_flat")
            q = g.add("Reshape", [g.add("Cast", [shifted], f"{hint}_q_cast",
                                        to=helper.np_dtype_to_tensor_dtype(enc.q.dtype)),
                                  g.ints(enc.shape, f"{hint}_q_shape")], f"{hint}_q")
        return og.dequantize(g, q, enc.scale, enc.zero_point, enc.axis, hint)
    if isinstance(enc, Shared):
        idx = og.unsigned_ints(g, enc.indices.ravel(), enc.bits, f"{hint}_indices", packed)
        flat = og.codebook_lookup(g, enc.codebook, idx, f"{hint}_flat" if
                                  len(enc.shape) > 1 else hint)
        if len(enc.shape) == 1:
            return flat
        return g.add("Reshape", [flat, g.ints(enc.shape, f"{hint}_shape")], hint)
    if not enc.indices.size:  # everything pruned
        return g.add("ConstantOfShape", [g.ints(enc.shape, f"{hint}_shape")], hint)
    vals = (g.constant(enc.values, f"{hint}_values") if isinstance(enc.values, np.ndarray)
            else emit(g, enc.values, f"{hint}_values", opset))
    return og.scatter_positions(g, enc.shape, enc.indices, vals, hint, packed)
