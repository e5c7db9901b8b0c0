"""Linear (uniform) quantization: int8 and 2-7 bits, symmetric or asymmetric, per tensor or
per output channel, from min/max; and ternary weights {-a, 0, +a}.

A quantized tensor is integer codes plus, per channel, a scale and a zero point.
Dequantization is a lookup in a small per-channel *codebook*
``(j - zero_point) * scale`` (float32), built by ``affine_codebook``: the model and
the .dcz loader both go through it, so a loaded model holds bitwise the same
weights as the quantized one. Zero is always exactly representable (symmetric:
code 0; asymmetric: the range is widened to contain 0), so pruned weights stay 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from distnet import backend
from distnet.nn.module import Module, Parameter

SCHEMES = ("symmetric", "asymmetric", "ternary")


@dataclass
class QuantizedTensor:
    """codes: int32, the tensor's shape, in [qmin, qmax]; scale (C,) float32;
    zero_point (C,) int32; C = 1 per tensor, else the size of axis 0 (channels)."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    bits: int
    scheme: str

    @property
    def per_channel(self) -> bool:
        return self.scale.size > 1

    def codebook(self) -> np.ndarray:
        return affine_codebook(self.scale, self.zero_point, self.qmin, self.qmax)

    def dequantize(self) -> np.ndarray:
        """float32 values of the codes' shape: ``codebook[channel, code - qmin]``."""
        return dequantize_codes(self.codes, self.scale, self.zero_point, self.qmin, self.qmax)


def affine_codebook(scale: np.ndarray, zero_point: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """(C, qmax - qmin + 1) float32: row c holds ``(j - zero_point[c]) * scale[c]``."""
    j = np.arange(qmin, qmax + 1, dtype=np.int64)
    steps = (j[None, :] - np.asarray(zero_point, np.int64).reshape(-1, 1)).astype(np.float32)
    return steps * np.asarray(scale, np.float32).reshape(-1, 1)


def dequantize_codes(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                     qmin: int, qmax: int) -> np.ndarray:
    book = affine_codebook(scale, zero_point, qmin, qmax)
    codes = np.asarray(codes)
    rows = np.zeros(codes.shape, np.int64) if book.shape[0] == 1 else np.broadcast_to(
        np.arange(codes.shape[0]).reshape((-1,) + (1,) * (codes.ndim - 1)), codes.shape)
    return book[rows, codes.astype(np.int64) - qmin]


def _channel_view(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """(C, rest) float64: one row per output channel, or a single row."""
    w = np.asarray(w, dtype=np.float64)
    return w.reshape(w.shape[0], -1) if per_channel and w.ndim > 0 else w.reshape(1, -1)


def quantize_tensor(w: Any, bits: int = 8, scheme: str = "symmetric",
                    per_channel: bool = False, threshold: float | None = None
                    ) -> QuantizedTensor:
    """Quantize ``w`` (any shape, float) to ``bits`` bits from its min/max.

    symmetric: codes in [-(2**(b-1) - 1), 2**(b-1) - 1], scale = max|w| / qmax,
    zero point 0. asymmetric: codes in [0, 2**b - 1] over [min(w, 0), max(w, 0)].
    ternary: codes {-1, 0, 1}; |w| <= threshold (default 0.7 * mean|w|, as in TWN/TTQ)
    becomes 0 and the rest +-a with a = mean |w| above the threshold (the L2-optimal
    scale). ``per_channel`` gives each slice along axis 0 its own scale.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")
    host = np.asarray(backend.to_host(w))
    rows = _channel_view(host, per_channel)
    if scheme == "ternary":
        return _ternary(host, rows, threshold)
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"linear quantization takes 2 to 8 bits, got {bits}")
    bits = int(bits)
    if scheme == "symmetric":
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
        amax = np.abs(rows).max(axis=1)
        scale = np.where(amax > 0, amax / qmax, 1.0)
        zp = np.zeros(rows.shape[0], np.int64)
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = np.minimum(rows.min(axis=1), 0.0), np.maximum(rows.max(axis=1), 0.0)
        scale = np.where(hi > lo, (hi - lo) / (qmax - qmin), 1.0)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax).astype(np.int64)
    scale32 = scale.astype(np.float32)
    q = np.round(rows / scale32.astype(np.float64)[:, None]) + zp[:, None]
    codes = np.clip(q, qmin, qmax).astype(np.int32).reshape(host.shape)
    return QuantizedTensor(codes, scale32, zp.astype(np.int32), qmin, qmax, bits, scheme)


def _ternary(host: np.ndarray, rows: np.ndarray, threshold: float | None) -> QuantizedTensor:
    a = np.abs(rows)
    t = 0.7 * a.mean(axis=1) if threshold is None else np.full(rows.shape[0], float(threshold))
    big = a > t[:, None]
    count = big.sum(axis=1)
    scale = np.where(count > 0, (a * big).sum(axis=1) / np.maximum(count, 1), 1.0)
    codes = (np.sign(rows) * big).astype(np.int32).reshape(host.shape)
    return QuantizedTensor(codes, scale.astype(np.float32), np.zeros(rows.shape[0], np.int32),
                           -1, 1, 2, "ternary")


def quantize_model(model: Module, bits: int = 8, scheme: str = "symmetric",
                   per_channel: bool = False, include_bias: bool = False,
                   names: list[str] | None = None) -> dict[str, QuantizedTensor]:
    """Quantize the weights (ndim >= 2; biases too when ``include_bias``) of ``model`` in
    place: each becomes its dequantized float32 values. Returns ``{name: QuantizedTensor}``
    for the .dcz writer. Pruned entries (mask 0) stay exactly 0.
    """
    params = dict(model.named_parameters())
    chosen = names if names is not None else [
        n for n, p in params.items() if p.data.ndim >= 2 or (include_bias and p.data.ndim == 1)]
    out: dict[str, QuantizedTensor] = {}
    for name in chosen:
        if name not in params:
            raise KeyError(f"no parameter named {name!r}")
        p: Parameter = params[name]
        qt = quantize_tensor(p.data, bits, scheme, per_channel and p.data.ndim >= 2)
        xp = backend.get_array_module(p.data)
        p.data[...] = xp.asarray(qt.dequantize())
        if p.mask is not None:
            p.data *= p.mask
        out[name] = qt
    return out


def quantization_error(w: Any, qt: QuantizedTensor) -> dict[str, float]:
    """Max and RMS absolute error, and the SQNR in dB, of ``qt`` against ``w``."""
    w = np.asarray(backend.to_host(w), np.float64)
    err = qt.dequantize().astype(np.float64) - w
    rms = float(np.sqrt(np.mean(err**2))) if err.size else 0.0
    power = float(np.mean(w**2)) if w.size else 0.0
    sqnr = 10 * np.log10(power / rms**2) if rms > 0 and power > 0 else float("inf")
    return {"max_abs": float(np.abs(err).max()) if err.size else 0.0, "rms": rms, "sqnr_db": sqnr}
