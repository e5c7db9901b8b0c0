"""Layers that reshape or rescale the input: Flatten and Normalize."""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend
from distnet.nn.module import Module


class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...): a view, no copy when x is contiguous.

    backward reshapes the gradient back (a view too). ``input_grad = False`` makes
    backward return ``None`` (see ``distnet.nn.linear.skip_input_grad``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.input_grad = True
        self._in_shape: tuple[int, ...] | None = None

    def forward(self, x: Any) -> Any:
        if x.ndim < 1:
            raise ValueError(f"Flatten: expected input (N, ...), got {tuple(x.shape)}")
        self._in_shape = tuple(x.shape)
        return x.reshape(x.shape[0], -1)

    def backward(self, grad_out: Any) -> Any:
        if self._in_shape is None:
            raise RuntimeError("Flatten.backward called before forward")
        if grad_out is None or not self.input_grad:
            return None
        return grad_out.reshape(self._in_shape)


def _as_buffer(value: Any, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"Normalize: {name} must be finite, got {value!r}")
    return array


class Normalize(Module):
    """``(x - mean) / std`` with ``mean`` and ``std`` kept as buffers.

    x: (N, *example) float32 -> same shape. ``mean``/``std``: scalars or arrays
    broadcastable to one example, e.g. ``(C, 1, 1)`` per channel for (N, C, H, W)
    images. Being buffers, they travel with the model's state_dict, checkpoint and
    ONNX export, so inference normalises exactly as training did.

    With mean 0 and std 1 forward returns x itself and backward the incoming
    gradient (no pass over the data). backward: ``grad / std``.
    """

    def __init__(self, mean: Any = 0.0, std: Any = 1.0) -> None:
        super().__init__()
        mean_a, std_a = _as_buffer(mean, "mean"), _as_buffer(std, "std")
        if np.any(std_a == 0):
            raise ValueError(f"Normalize: std must be non-zero, got {std!r}")
        try:
            np.broadcast_shapes(mean_a.shape, std_a.shape)
        except ValueError:
            raise ValueError(f"Normalize: mean {mean_a.shape} and std {std_a.shape} "
                             "do not broadcast together") from None
        self.register_buffer("mean", mean_a)
        self.register_buffer("std", std_a)
        self.input_grad = True

    def get_config(self) -> dict[str, Any]:
        # Reads the buffers, so a config taken after load_state_dict matches the weights.
        return {"mean": backend.to_host(self.mean).tolist(),
                "std": backend.to_host(self.std).tolist()}

    def is_identity(self) -> bool:
        """True when mean is all 0 and std all 1 (checked per call: buffers load in place)."""
        return bool((self.mean == 0).all()) and bool((self.std == 1).all())

    def _check(self, x: Any) -> None:
        example = tuple(x.shape[1:])
        ok = x.ndim >= 1
        if ok:
            for stat in (self.mean, self.std):
                try:
                    ok = ok and np.broadcast_shapes(stat.shape, example) == example
                except ValueError:
                    ok = False
        if not ok:
            raise ValueError(f"Normalize(mean {tuple(self.mean.shape)}, std "
                             f"{tuple(self.std.shape)}): expected input (N, ...) whose example "
                             f"shape they broadcast to, got {tuple(x.shape)}")

    def forward(self, x: Any) -> Any:
        self._check(x)
        self._identity = self.is_identity()
        if self._identity:
            return x
        xp = backend.get_array_module(x)
        out = self.workspace("out", x.shape, xp.result_type(x.dtype, self.mean.dtype), xp)
        xp.subtract(x, self.mean, out=out)
        out /= self.std
        return out

    def backward(self, grad_out: Any) -> Any:
        if grad_out is None or not self.input_grad:
            return None
        if getattr(self, "_identity", None) is None:
            raise RuntimeError("Normalize.backward called before forward")
        if self._identity:
            return grad_out
        xp = backend.get_array_module(grad_out)
        grad_in = self.workspace("grad_in", grad_out.shape, grad_out.dtype, xp)
        return xp.divide(grad_out, self.std, out=grad_in)
