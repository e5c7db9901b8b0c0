"""Batch normalisation over (N, C), (N, C, L) and (N, C, H, W) inputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend
from distnet.nn.module import Module, Parameter


class _BatchNorm(Module):
    """``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel (axis 1).

    Training uses the batch's statistics (biased variance) and updates the buffers
    ``running_mean``/``running_var`` in place as PyTorch does: ``r = (1 - momentum) *
    r + momentum * batch_stat``, with the unbiased variance. Eval uses the running
    statistics. weight (C,) starts at 1 and bias (C,) at 0.
    """

    _layouts: tuple[str, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"{type(self).__name__}: num_features must be positive")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.weight = Parameter(np.ones(num_features, dtype=np.float32))
        self.bias = Parameter(np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))
        self._xhat: Any = None

    def get_config(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum}

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"

    def _check(self, x: Any) -> None:
        ndims = [len(layout.split(", ")) for layout in self._layouts]
        if x.ndim not in ndims or x.shape[1] != self.num_features:
            expected = " or ".join(f"({s})" for s in self._layouts)
            expected = expected.replace("C", str(self.num_features))
            raise ValueError(f"{type(self).__name__}({self.num_features}): expected input "
                             f"{expected}, got {tuple(x.shape)}")

    def forward(self, x: Any) -> Any:
        self._check(x)
        xp = backend.get_array_module(x)
        axes = (0,) + tuple(range(2, x.ndim))
        bshape = (self.num_features,) + (1,) * (x.ndim - 2)  # broadcasts against (N, C, ...)
        count = x.size // self.num_features
        dtype = xp.result_type(x.dtype, self.weight.data.dtype)
        xhat = self.workspace("xhat", x.shape, dtype, xp)
        out = self.workspace("out", x.shape, dtype, xp)
        if self.training:
            if count < 2:
                raise ValueError(f"{type(self).__name__}({self.num_features}): training needs "
                                 f"more than one value per channel, got input {tuple(x.shape)}")
            mean = x.mean(axis=axes)
            xp.subtract(x, mean.reshape(bshape), out=xhat)
            sq = xp.multiply(xhat, xhat, out=out)  # out is free until the end: scratch
            var = sq.mean(axis=axes)
            # Through locals: `self.running_mean *= ...` would re-assign the attribute,
            # and Module.__setattr__ would drop it from the buffers.
            m, running_mean, running_var = self.momentum, self.running_mean, self.running_var
            running_mean *= 1 - m
            running_mean += m * mean
            running_var *= 1 - m
            running_var += (m * count / (count - 1)) * var
        else:
            mean, var = self.running_mean, self.running_var
            xp.subtract(x, mean.reshape(bshape), out=xhat)
        inv_std = 1.0 / xp.sqrt(var + self.eps)
        xhat *= inv_std.reshape(bshape)
        xp.multiply(xhat, self.weight.data.reshape(bshape), out=out)
        out += self.bias.data.reshape(bshape)
        self._xhat, self._inv_std, self._axes, self._bshape = xhat, inv_std, axes, bshape
        self._batch_stats = self.training
        return out

    def backward(self, grad_out: Any) -> Any:
        xhat = self._xhat
        if xhat is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        xp = backend.get_array_module(grad_out)
        axes, bshape = self._axes, self._bshape
        grad_in = self.workspace("grad_in", xhat.shape, xhat.dtype, xp)
        grad_out.sum(axis=axes, out=self.bias.grad)
        xp.multiply(grad_out, xhat, out=grad_in)
        grad_in.sum(axis=axes, out=self.weight.grad)
        scale = (self.weight.data * self._inv_std).reshape(bshape)
        if self._batch_stats:
            # d/dx through the batch mean and variance too:
            # dx = w * inv_std * (g - mean(g) - xhat * mean(g * xhat)).
            count = xhat.size // self.num_features
            xp.multiply(xhat, (self.weight.grad / count).reshape(bshape), out=grad_in)
            xp.subtract(grad_out, grad_in, out=grad_in)
            grad_in -= (self.bias.grad / count).reshape(bshape)
            grad_in *= scale
        else:
            xp.multiply(grad_out, scale, out=grad_in)
        return grad_in


class BatchNorm1d(_BatchNorm):
    """Batch norm of x: (N, C) or (N, C, L) float32 over N (and L); y has x's shape."""

    _layouts = ("N, C", "N, C, L")


class BatchNorm2d(_BatchNorm):
    """Batch norm of x: (N, C, H, W) float32 per channel over N, H, W; y has x's shape."""

    _layouts = ("N, C, H, W",)
