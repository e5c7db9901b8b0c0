"""Gradient codecs: what a worker sends instead of the dense gradient.

A codec is two methods, Horovod style:

    payload, meta = codec.compress(key, grad)        # on the worker
    grad = codec.decompress(payload, meta, shape, dtype, out=None)   # on the server

``payload`` is a list of NumPy arrays (the bytes that travel), ``meta`` a small
msgpack-able dict (a scale, a count). ``layout(meta, shape, dtype)`` says, from the
header alone, which arrays a payload holds (dtype and length of each), so the
protocol can check every frame's byte length *before* it looks at the bytes.
The payload arrays of one tensor travel in one frame, back to back.

Codecs (``CODECS``):

- ``none``: the array itself, zero-copy.
- ``fp16``: float16 (2 bytes a value). Values beyond +-65504 become inf, which the
  server rejects as a non-finite gradient.
- ``int8``: one byte a value and a per-tensor float scale ``max|g| / 127``;
  stochastic rounding (``floor(g / scale + u)``, ``u ~ U[0, 1)``) keeps the decoded
  gradient unbiased. Each worker seeds its own generator.
- ``topk``: the ``ratio`` fraction of entries largest in magnitude, as int32 flat
  indices and float32 values (8 bytes per kept entry). Error feedback: what was
  not sent is kept per key on the worker and added to the next gradient, so over
  many steps every bit of the gradient is eventually applied.

Stateful codecs (error feedback, generators) belong to one worker: build one per
client with ``build_codec``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

Payload = list[np.ndarray]
Layout = list[tuple[np.dtype, int]]  # (dtype, number of elements) per payload array

_I32 = np.dtype("<i4")
_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I8 = np.dtype("i1")


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def payload_nbytes(payload: Payload) -> int:
    """Bytes a payload puts on the wire (without the header)."""
    return sum(int(a.nbytes) for a in payload)


class Codec:
    """Base class. Subclasses set ``name`` and implement the four methods."""

    name: ClassVar[str] = ""

    def compress(self, key: str, grad: np.ndarray) -> tuple[Payload, dict[str, Any]]:
        """grad: any shape, float dtype -> (payload arrays, meta)."""
        raise NotImplementedError

    def decompress(self, payload: Payload, meta: dict[str, Any], shape: tuple[int, ...],
                   dtype: np.dtype, out: np.ndarray | None = None) -> np.ndarray:
        """Rebuild the gradient, ``shape``/``dtype``; into ``out`` when given.

        Raises ValueError when the payload contradicts itself (e.g. an index out of range).
        """
        raise NotImplementedError

    @classmethod
    def layout(cls, meta: dict[str, Any], shape: tuple[int, ...], dtype: np.dtype) -> Layout:
        """Payload arrays implied by a header; raises ValueError on bad metadata."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget per-key state (error-feedback residuals)."""


def _into(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"out is {out.shape} {out.dtype}, need {tuple(shape)} {dtype}")
    return out


class NoCompression(Codec):
    """The dense array, sent without a copy."""

    name = "none"

    def compress(self, key: str, grad: np.ndarray) -> tuple[Payload, dict[str, Any]]:
        return [np.ascontiguousarray(grad).reshape(-1)], {}

    def decompress(self, payload, meta, shape, dtype, out=None):
        arr = payload[0].reshape(shape)
        if out is None:
            return arr  # a view of the received frame: no copy
        np.copyto(_into(out, shape, dtype), arr)
        return out

    @classmethod
    def layout(cls, meta, shape, dtype):
        return [(np.dtype(dtype), _numel(shape))]


class FP16(Codec):
    """float16 values: half the bytes of float32, about 3 significant digits."""

    name = "fp16"

    def compress(self, key, grad):
        return [np.asarray(grad, dtype=_F16).reshape(-1)], {}

    def decompress(self, payload, meta, shape, dtype, out=None):
        out = _into(out, shape, dtype)
        np.copyto(out, payload[0].reshape(shape), casting="unsafe")
        return out

    @classmethod
    def layout(cls, meta, shape, dtype):
        return [(_F16, _numel(shape))]


class Int8(Codec):
    """int8 with a per-tensor scale and stochastic (unbiased) rounding.

    seed: seeds this codec's generator; give each worker its own.
    """

    name = "int8"

    def __init__(self, seed: int | None = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def compress(self, key, grad):
        x = np.asarray(grad).reshape(-1)
        amax = float(np.max(np.abs(x))) if x.size else 0.0
        if not math.isfinite(amax):
            raise ValueError(f"gradient {key!r} is not finite; int8 cannot encode it")
        scale = amax / 127.0
        if scale == 0.0:
            return [np.zeros(x.size, _I8)], {"scale": 0.0}
        y = np.multiply(x, np.float32(1.0 / scale), dtype=np.float32)
        y += self.rng.random(x.size, dtype=np.float32)  # floor(y + u) is unbiased for y
        np.floor(y, out=y)
        np.clip(y, -127, 127, out=y)  # rounding of 1/scale may step just past 127
        return [y.astype(_I8)], {"scale": scale}

    def decompress(self, payload, meta, shape, dtype, out=None):
        out = _into(out, shape, dtype)
        np.multiply(payload[0].reshape(shape), dtype.type(meta["scale"]), out=out,
                    casting="unsafe")
        return out

    @classmethod
    def layout(cls, meta, shape, dtype):
        scale = meta.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError("int8 needs a numeric 'scale'")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"int8 scale {scale!r} is not a finite non-negative number")
        return [(_I8, _numel(shape))]


class TopK(Codec):
    """The ``ratio`` largest-magnitude entries (at least one) plus error feedback.

    ratio: fraction kept, in (0, 1]. The residual of each key (float32, the key's
    shape) is added to the next gradient of that key before selecting.
    """

    name = "topk"

    def __init__(self, ratio: float = 0.01) -> None:
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"topk ratio must be in (0, 1], got {ratio!r}")
        self.ratio = float(ratio)
        self.residuals: dict[str, np.ndarray] = {}

    def compress(self, key, grad):
        g = np.asarray(grad).reshape(-1)
        acc = self.residuals.get(key)
        if acc is None or acc.size != g.size:
            acc = self.residuals[key] = np.zeros(g.size, _F32)
        acc += g  # acc = gradient + what earlier steps left unsent
        n = acc.size
        k = min(n, max(1, math.ceil(self.ratio * n))) if n else 0
        if k == n:
            idx = np.arange(n, dtype=_I32)
        else:
            idx = np.argpartition(np.abs(acc), n - k)[n - k:].astype(_I32)
            idx.sort()  # ascending indices: deterministic and cache-friendly to scatter
        vals = acc[idx]
        acc[idx] = 0.0  # sent: no longer owed
        return [idx, vals], {"k": int(k)}

    def decompress(self, payload, meta, shape, dtype, out=None):
        idx, vals = payload
        n = _numel(shape)
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"topk index out of range [0, {n})")
        out = _into(out, shape, dtype)
        out[...] = 0
        out.reshape(-1)[idx] = vals
        return out

    @classmethod
    def layout(cls, meta, shape, dtype):
        k = meta.get("k")
        if isinstance(k, bool) or not isinstance(k, int):
            raise ValueError("topk needs an integer 'k'")
        if not 0 <= k <= _numel(shape):
            raise ValueError(f"topk k={k} outside [0, {_numel(shape)}]")
        return [(_I32, k), (_F32, k)]

    def reset(self) -> None:
        self.residuals.clear()


CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoCompression, FP16, Int8, TopK)}


def codec_class(name: str) -> type[Codec]:
    """The codec class registered as ``name``; KeyError naming the known ones."""
    try:
        return CODECS[name]
    except KeyError:
        raise KeyError(f"unknown codec {name!r}; known: {sorted(CODECS)}") from None


def build_codec(name: str = "none", **config: Any) -> Codec:
    """A fresh codec instance (one per worker: it may hold residuals and a generator)."""
    return codec_class(name)(**config)
