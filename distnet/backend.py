"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU.

This is the only module that imports CuPy. Everything else asks for the array
module of the data it holds (``xp = get_array_module(x)``) and writes ``xp.``
math, so one code path serves both devices. Arrays cross between host and
device only at the edges (network, checkpoints, export) through ``to_host`` and
``to_device``.

The default device comes from ``DISTNET_DEVICE`` (``cpu`` or ``cuda``); asking
for ``cuda`` where CuPy or a GPU is missing raises ``DeviceError``, never a
silent fallback to the CPU.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

DEFAULT_DTYPE = np.float32
DEVICES = ("cpu", "cuda")

_cupy: ModuleType | None = None
_cupy_error: str | None = None
_default_device: str | None = None


class DeviceError(RuntimeError):
    """The requested device cannot be used here."""


def _load_cupy() -> ModuleType:
    """Import CuPy and check that a GPU answers; raise DeviceError otherwise."""
    global _cupy, _cupy_error
    if _cupy is not None:
        return _cupy
    if _cupy_error is not None:
        raise DeviceError(_cupy_error)
    try:
        import cupy  # noqa: PLC0415 - the one place CuPy is imported

        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            raise RuntimeError("no CUDA device found")
        cupy.zeros(1).sum()  # fails here, not later, if the driver is broken
    except Exception as exc:  # ImportError, CUDARuntimeError, ...
        _cupy_error = (
            f"device 'cuda' is not available: {type(exc).__name__}: {exc} "
            "(install the 'gpu' extra on a machine with an NVIDIA GPU, or use --device cpu)"
        )
        raise DeviceError(_cupy_error) from None
    _cupy = cupy
    return cupy


def cuda_available() -> bool:
    """True when CuPy imports and a GPU works."""
    try:
        _load_cupy()
    except DeviceError:
        return False
    return True


def check_device(device: str) -> str:
    """Validate a device name and, for ``cuda``, that it works; returns it."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cuda":
        _load_cupy()
    return device


def default_device() -> str:
    """The device new models and data go to: ``DISTNET_DEVICE`` or ``cpu``."""
    global _default_device
    if _default_device is None:
        _default_device = check_device(os.environ.get("DISTNET_DEVICE", "cpu").strip().lower())
    return _default_device


def set_default_device(device: str) -> None:
    global _default_device
    _default_device = check_device(device)


def array_module(device: str) -> ModuleType:
    """``numpy`` for ``cpu``, ``cupy`` for ``cuda``."""
    return _load_cupy() if check_device(device) == "cuda" else np


def get_array_module(*arrays: Any) -> ModuleType:
    """The array module (numpy or cupy) that holds ``arrays``; numpy when none is on a GPU."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def device_of(x: Any) -> str:
    return "cuda" if get_array_module(x) is not np else "cpu"


def to_host(x: Any) -> np.ndarray:
    """A NumPy array with the contents of ``x`` (no copy when it is already one)."""
    if _cupy is not None and isinstance(x, _cupy.ndarray):
        return _cupy.asnumpy(x)
    return np.asarray(x)


def to_device(x: Any, device: str | None = None) -> Any:
    """``x`` as an array on ``device`` (default: the default device)."""
    device = check_device(device or default_device())
    if device == "cpu":
        return to_host(x)
    return _load_cupy().asarray(x)


def as_dtype(x: Any, dtype: Any = DEFAULT_DTYPE) -> Any:
    """``x`` with ``dtype``, on the device it already lives on."""
    xp = get_array_module(x)
    return xp.asarray(x, dtype=dtype)
