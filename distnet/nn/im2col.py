"""Strided-view helpers for Conv2d and the pooling layers: windows, row-blocked im2col/col2im.

Everything works on *physical* NHWC arrays (channels innermost), which is the
layout whose patches are long contiguous runs, and returns arrays that callers
view as PyTorch's logical (N, C, H, W) with ``transpose(0, 3, 1, 2)``.

Row-blocked im2col
------------------
Plain im2col makes one row per output pixel holding its ``KH*KW*C`` patch. The
blocked form makes one row per block of ``B`` adjacent output pixels of a row,
holding the union of their patches: ``KH`` rows of ``L = (B-1)*sw + KW`` pixels.
The weights then become a banded (block-Toeplitz) matrix ``M`` of shape
``(B*O, KH*L*C)`` with ``M[(b, o), (i, l, c)] = W[o, c, i, l - b*sw]`` inside the
band and 0 outside, and

    forward      out  (R, B*O)        = cols (R, KH*L*C) @ M.T
    grad weight  gM   (B*O, KH*L*C)   = g.T @ cols;  W-grad = sum of gM's B bands
    grad input   T    (R, KH*L*C)     = g @ M;       then col2im of T

with ``R = N*OH*OW/B``. ``B = 1`` is plain im2col. A larger ``B`` costs ``L/KW``
times the GEMM FLOPs but shrinks the column matrix ``B*KW/L`` times and makes
the copies ``L*C`` long instead of ``KW*C``: it pays when ``C`` is small (the
first layer) and for col2im, whose scatter-add is memory bound.

col2im adds ``T`` back with one add per kernel row ``i`` and *phase* ``r``:
blocks ``r, r+q, r+2q, ...`` with ``q = ceil(L / (B*sw))`` do not overlap, so
each add is a single strided operation, ``KH*q`` of them in all (``KH*KW`` for
plain stride-1 im2col, ``KH`` when windows do not overlap).
"""

from __future__ import annotations

import math
from typing import Any

Pair = tuple[int, int]


def pair(value: Any, name: str, owner: str, minimum: int) -> Pair:
    """``value`` (an int or a pair) as a pair of ints, each at least ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        out = (value, value)
    else:
        try:
            out = tuple(int(v) for v in value)
        except TypeError:
            raise TypeError(f"{owner}: {name} must be an int or a pair of ints, "
                            f"got {value!r}") from None
        if len(out) != 2 or any(isinstance(v, bool) for v in value):
            raise TypeError(f"{owner}: {name} must be an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise ValueError(f"{owner}: {name} must be at least {minimum}, got {value!r}")
    return out  # type: ignore[return-value]


def as_config(p: Pair) -> int | list[int]:
    """A pair as JSON: an int when square, else ``[h, w]``."""
    return p[0] if p[0] == p[1] else [p[0], p[1]]


def output_size(owner: str, shape: tuple[int, ...], kernel: Pair, stride: Pair,
                padding: Pair) -> Pair:
    """PyTorch's (floor) output size; ValueError naming ``owner`` when it is not positive."""
    h, w = shape[-2:]
    oh = (h + 2 * padding[0] - kernel[0]) // stride[0] + 1
    ow = (w + 2 * padding[1] - kernel[1]) // stride[1] + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"{owner}: input {tuple(shape)} padded by {padding} is smaller than "
                         f"the kernel {kernel}: the output size would be {oh}x{ow}")
    return oh, ow


def as_strided(xp: Any, a: Any, shape: tuple[int, ...], strides: tuple[int, ...]) -> Any:
    """A view of ``a``'s memory (from ``a``'s first element) with ``shape`` and byte ``strides``."""
    return xp.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)


def layout_like(module: Any, key: str, x: Any, shape: tuple[int, ...], dtype: Any, xp: Any,
                fill: float | None = None) -> Any:
    """A workspace of logical ``shape`` whose memory order follows ``x``'s strides.

    Element-wise ops between ``x``-derived views and this buffer then walk memory in
    order (an NHWC-physical input gets an NHWC-physical output). With ``fill``, the
    buffer is filled with it when (re)allocated.
    """
    order = sorted(range(x.ndim), key=lambda d: (-abs(x.strides[d]) if x.shape[d] > 1 else 0, d))
    physical = tuple(shape[d] for d in order)
    key = f"{key}{order}"  # one buffer per memory order: a border filled for one is not another's
    if fill is None:
        buf = module.workspace(key, physical, dtype, xp)
    else:
        buf, _ = fresh_workspace(module, key, physical, dtype, xp, fill)
    return buf.transpose([order.index(d) for d in range(x.ndim)])


def fresh_workspace(module: Any, key: str, shape: tuple[int, ...], dtype: Any, xp: Any,
                    fill: float = 0) -> tuple[Any, bool]:
    """``module.workspace`` filled with ``fill`` when (re)allocated; returns (buffer, fresh)."""
    old = module._workspace.get(key)
    buf = module.workspace(key, shape, dtype, xp)
    fresh = buf is not old
    if fresh:
        buf.fill(fill)
    return buf, fresh


def nhwc_source(module: Any, x: Any, padding: Pair, dtype: Any, xp: Any,
                fill: float = 0) -> Any:
    """``x`` (N, C, H, W) as a physical (N, H+2ph, W+2pw, C) array.

    ``x`` itself (a view) when unpadded, of ``dtype`` and NHWC in memory with channels
    contiguous; otherwise a copy into a workspace whose border holds ``fill``.
    """
    n, c, h, w = x.shape
    ph, pw = padding
    xt = x.transpose(0, 2, 3, 1)
    item = x.dtype.itemsize
    if (ph == pw == 0 and x.dtype == dtype
            and (c == 1 or xt.strides[3] == item) and (w == 1 or xt.strides[2] == c * item)):
        return xt
    buf, _ = fresh_workspace(module, "src", (n, h + 2 * ph, w + 2 * pw, c), dtype, xp, fill)
    xp.copyto(buf[:, ph:ph + h, pw:pw + w, :], xt)
    return buf


# ---- row-blocked im2col ---------------------------------------------------------------------

def block_cost(n_rows: int, ow: int, o: int, c: int, kernel: Pair, sw: int, b: int,
               backward: bool) -> float:
    """Estimated seconds of the blocked forward (+ weight grad) or input-grad for block ``b``.

    A rough model of the 2-core CPU, fitted to LeNet-5's layers: GEMMs at ~150 GFLOP/s,
    and memory traffic per element of the column matrix (written by im2col, read by
    two GEMMs; or written by a GEMM and read by col2im) plus a cost per contiguous run.
    It only has to rank the candidates.
    """
    kh, kw = kernel
    length = (b - 1) * sw + kw
    rows = n_rows * (ow // b)
    flops = 2.0 * rows * (b * o) * (kh * length * c)
    elems = rows * kh * length * c
    run = length * c
    if backward:  # one GEMM, then KH*q strided adds (read + write of the destination)
        q = math.ceil(length / (b * sw))
        return flops / 150e9 + elems * 1.0e-9 + (elems / run) * 6e-9 + kh * q * 5e-6
    # forward GEMM + weight-grad GEMM, the column copy and the GEMMs' reads of it
    return 2 * flops / 150e9 + elems * 1.0e-9 + (elems / run) * 6e-9


def choose_block(n_rows: int, ow: int, o: int, c: int, kernel: Pair, sw: int,
                 backward: bool) -> int:
    """The divisor ``B`` of ``ow`` with the lowest ``block_cost`` (ties: the smaller)."""
    candidates = [b for b in range(1, min(ow, 16) + 1) if ow % b == 0]
    return min(candidates,
               key=lambda b: (block_cost(n_rows, ow, o, c, kernel, sw, b, backward), b))


def fill_columns(xp: Any, src: Any, cols: Any, kernel: Pair, stride: Pair, b: int) -> None:
    """im2col: ``cols`` (N, OH, OW/B, KH, L, C) <- the blocked patches of ``src`` (N, Hp, Wp, C)."""
    n, oh, nb, kh, length, c = cols.shape
    s_n, s_h, s_w, s_c = src.strides
    view = as_strided(xp, src, cols.shape,
                      (s_n, stride[0] * s_h, b * stride[1] * s_w, s_h, s_w, s_c))
    xp.copyto(cols, view)


def band(xp: Any, m: Any, sw: int, kw: int) -> Any:
    """The band of ``m`` (B, O, KH, L, C) holding the weights: a (B, O, KH, KW, C) view.

    ``band[b, o, i, j, c]`` is ``m[b, o, i, b*sw + j, c]``.
    """
    s = m.strides
    nb, o, kh, _, c = m.shape
    return as_strided(xp, m, (nb, o, kh, kw, c), (s[0] + sw * s[3], s[1], s[2], s[3], s[4]))


def add_columns(xp: Any, t: Any, grad_src: Any, kernel: Pair, stride: Pair, b: int) -> None:
    """col2im: add ``t`` (N, OH, OW/B, KH, L*C) into ``grad_src`` (N, Hp, Wp, C), zeroed by caller.

    One add per (kernel row, phase): blocks ``r, r+q, ...`` never overlap.
    """
    n, oh, nb, kh, run = t.shape
    sh, sw = stride
    length = run // grad_src.shape[3]
    q = math.ceil(length / (b * sw))
    g_n, g_h, g_w, g_c = grad_src.strides
    for i in range(kh):
        for r in range(min(q, nb)):
            count = (nb - r + q - 1) // q
            start = grad_src[:, i:, r * b * sw:, :]
            dst = as_strided(xp, start, (n, oh, count, run), (g_n, sh * g_h, q * b * sw * g_w, g_c))
            xp.add(dst, t[:, :, r::q, i, :], out=dst)
