"""2-D max and average pooling over strided window views.

Both layers see the input through one ``as_strided`` view of its windows,
(N, C, OH, OW, KH, KW); forward loops over the ``KH*KW`` kernel offsets only, each
step one element-wise op over the whole output. When windows do not overlap
(stride == kernel, no padding: the common 2x2 pool) they tile the input, which
is then viewed as (N, C, OH, KH, OW, KW) and backward is one broadcast op per
array over the input (two for max pooling), with no zero fill (when the tiles
cover the input) and no accumulation; overlapping windows loop over the kernel
offsets and accumulate. Outputs and gradients keep the memory order of the
input (an NHWC-in-memory input, as Conv2d produces, gives NHWC-in-memory
results); a gradient arriving in another order is copied into it first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnet import backend
from distnet.nn import im2col
from distnet.nn.module import Module


class _Pool2d(Module):
    """Shared geometry, checks and window views of MaxPool2d and AvgPool2d."""

    _pad_value = 0.0

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> None:
        super().__init__()
        name = f"{type(self).__name__}(kernel_size={kernel_size!r})"
        self.kernel_size = im2col.pair(kernel_size, "kernel_size", name, 1)
        self._stride_given = stride is not None
        self.stride = self.kernel_size if stride is None else im2col.pair(stride, "stride", name, 1)
        self.padding = im2col.pair(padding, "padding", name, 0)
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size, strict=True)):
            raise ValueError(f"{name}: padding {self.padding} must be at most half the kernel "
                             f"size {self.kernel_size} (as in PyTorch)")
        self.input_grad = True
        self._saved: dict[str, Any] | None = None

    def get_config(self) -> dict[str, Any]:
        return {"kernel_size": im2col.as_config(self.kernel_size),
                "stride": im2col.as_config(self.stride) if self._stride_given else None,
                "padding": im2col.as_config(self.padding)}

    def _name(self) -> str:
        return f"{type(self).__name__}(kernel_size={im2col.as_config(self.kernel_size)})"

    def _disjoint(self) -> bool:
        return self.stride == self.kernel_size and self.padding == (0, 0)

    def _prepare(self, x: Any) -> tuple[Any, Any, Any, tuple[int, int]]:
        """Checks ``x``; returns (xp, padded source, window view, (OH, OW))."""
        if x.ndim != 4:
            raise ValueError(f"{self._name()}: expected input (N, C, H, W), got {tuple(x.shape)}")
        oh, ow = im2col.output_size(self._name(), x.shape, self.kernel_size, self.stride,
                                    self.padding)
        xp = backend.get_array_module(x)
        src = x
        ph, pw = self.padding
        if ph or pw:
            n, c, h, w = x.shape
            src = im2col.layout_like(self, "src", x, (n, c, h + 2 * ph, w + 2 * pw), x.dtype, xp,
                                     fill=self._pad_value)
            xp.copyto(src[:, :, ph:ph + h, pw:pw + w], x)
        return xp, src, self._windows(xp, src, oh, ow), (oh, ow)

    def _windows(self, xp: Any, a: Any, oh: int, ow: int) -> Any:
        s_n, s_c, s_h, s_w = a.strides
        sh, sw = self.stride
        return im2col.as_strided(xp, a, a.shape[:2] + (oh, ow) + self.kernel_size,
                                 (s_n, s_c, sh * s_h, sw * s_w, s_h, s_w))

    def _tiles(self, xp: Any, a: Any, oh: int, ow: int) -> Any:
        """Non-overlapping windows of ``a`` (N, C, H, W) as a (N, C, OH, KH, OW, KW) view."""
        s_n, s_c, s_h, s_w = a.strides
        kh, kw = self.kernel_size
        return im2col.as_strided(xp, a, (a.shape[0], a.shape[1], oh, kh, ow, kw),
                                 (s_n, s_c, kh * s_h, s_h, kw * s_w, s_w))

    def _reduce(self, x: Any, ufunc: str) -> tuple[Any, Any, Any, Any, tuple[int, int]]:
        """Fold every window of ``x`` with ``xp.<ufunc>`` (maximum, add) into the output
        workspace, one strided pass per kernel offset; returns what backward needs too."""
        xp, src, win, (oh, ow) = self._prepare(x)
        out = im2col.layout_like(self, "out", src, x.shape[:2] + (oh, ow), x.dtype, xp)
        fold = getattr(xp, ufunc)
        offsets = self._offsets()
        if len(offsets) == 1:
            xp.copyto(out, win[..., 0, 0])
        else:
            fold(win[..., 0, 0], win[..., offsets[1][0], offsets[1][1]], out=out)
        for i, j in offsets[2:]:
            fold(out, win[..., i, j], out=out)
        return xp, src, win, out, (oh, ow)

    def _save(self, x: Any, src: Any, result: Any, **extra: Any) -> None:
        """What backward needs: shapes and layout of the output, plus ``extra``."""
        self._saved = {"x_shape": tuple(x.shape), "src": src, "out_shape": tuple(result.shape),
                       "out_strides": result.strides, "dtype": result.dtype, **extra}

    def _offsets(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.kernel_size[0]) for j in range(self.kernel_size[1])]

    def _grad_buffers(self, grad_out: Any) -> tuple[Any, Any, Any, Any]:
        """(array module, grad_out in the output's memory order, grad w.r.t. the padded
        source, its window view); the source grad is zeroed unless backward overwrites all
        of it."""
        xp = backend.get_array_module(grad_out)
        saved = self._saved
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        if tuple(grad_out.shape) != saved["out_shape"]:
            raise ValueError(f"{self._name()}: backward expected grad_out {saved['out_shape']} "
                             f"(the forward output's shape), got {tuple(grad_out.shape)}")
        src = saved["src"]
        if grad_out.strides != saved["out_strides"] or grad_out.dtype != saved["dtype"]:
            buf = im2col.layout_like(self, "grad_out", src, grad_out.shape, saved["dtype"], xp)
            xp.copyto(buf, grad_out)  # one pass here saves mixed-order passes below
            grad_out = buf
        grad_src = im2col.layout_like(self, "grad_src", src, src.shape, grad_out.dtype, xp)
        oh, ow = saved["out_shape"][2:]
        kh, kw = self.kernel_size
        if not (self._disjoint() and oh * kh == src.shape[2] and ow * kw == src.shape[3]):
            grad_src.fill(0)
        return xp, grad_out, grad_src, self._windows(xp, grad_src, oh, ow)

    def _unpad(self, grad_src: Any) -> Any:
        ph, pw = self.padding
        _, _, h, w = self._saved["x_shape"]
        return grad_src[:, :, ph:ph + h, pw:pw + w]


class MaxPool2d(_Pool2d):
    """Max over each window, as PyTorch's ``nn.MaxPool2d`` (floor mode, no dilation).

    x: (N, C, H, W) -> (N, C, OH, OW), ``OH = (H + 2*ph - kh) // sh + 1``; ``stride``
    defaults to ``kernel_size``; padding (at most half the kernel) counts as -inf.
    Backward sends each output's gradient to the first maximum of its window in
    row-major order (PyTorch's choice on ties). The mask of those maxima is derived
    in backward from the input and output kept from forward (the input stays valid
    until its producer's next call, the workspace contract), so forward is just
    ``KH*KW - 1`` maxima.
    """

    _pad_value = -np.inf

    def forward(self, x: Any) -> Any:
        _, src, win, out, _ = self._reduce(x, "maximum")
        self._save(x, src, out, win=win, out=out)
        return out

    def backward(self, grad_out: Any) -> Any:
        if grad_out is None or not self.input_grad:
            return None
        xp, grad_out, grad_src, grad_win = self._grad_buffers(grad_out)
        saved = self._saved
        src, win, out = saved["src"], saved["win"], saved["out"]
        oh, ow = out.shape[2:]
        offsets = self._offsets()
        taken = im2col.layout_like(self, "taken", out, out.shape, xp.bool_, xp)  # ties, overlaps
        if self._disjoint():
            # hit = (x == max of its tile), broadcast over each tile: one pass over x.
            hit_buf = im2col.layout_like(self, "hit", src, src.shape, xp.bool_, xp)
            hit = self._tiles(xp, hit_buf, oh, ow)
            xp.equal(self._tiles(xp, src, oh, ow), out[:, :, :, None, :, None], out=hit)
            if int(xp.count_nonzero(hit)) != out.size:  # ties: keep the first maximum only
                self._first_only([hit[:, :, :, i, :, j] for i, j in offsets], taken, xp)
            xp.multiply(hit, grad_out[:, :, :, None, :, None],
                        out=self._tiles(xp, grad_src, oh, ow))
            return self._unpad(grad_src)
        hit = im2col.layout_like(self, "hit", out, out.shape, xp.bool_, xp)
        part = im2col.layout_like(self, "part", out, out.shape, grad_out.dtype, xp)
        for k, (i, j) in enumerate(offsets):
            xp.equal(win[..., i, j], out, out=hit)
            self._first_only([hit], taken, xp, first=k == 0, last=k + 1 == len(offsets))
            xp.multiply(grad_out, hit, out=part)
            dst = grad_win[..., i, j]
            xp.add(dst, part, out=dst)
        return self._unpad(grad_src)

    @staticmethod
    def _first_only(hits: list[Any], taken: Any, xp: Any, first: bool = True,
                    last: bool = True) -> None:
        """Clear each hit already taken by an earlier offset, in row-major window order."""
        for k, hit in enumerate(hits):
            if not (first and k == 0):
                xp.greater(hit, taken, out=hit)  # hit and not taken
            if last and k + 1 == len(hits):
                break
            if first and k == 0:
                xp.copyto(taken, hit)
            else:
                xp.logical_or(taken, hit, out=taken)


class AvgPool2d(_Pool2d):
    """Mean over each window, as PyTorch's ``nn.AvgPool2d`` (floor mode).

    x: (N, C, H, W) -> (N, C, OH, OW); ``stride`` defaults to ``kernel_size``; padding
    counts as zeros. ``count_include_pad=True`` (PyTorch's default) divides by
    ``kh*kw`` everywhere; ``False`` by the number of input elements in each window.
    """

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 count_include_pad: bool = True) -> None:
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = bool(count_include_pad)
        self._scales: dict[tuple[Any, ...], Any] = {}  # per input size: 1 / divisor, (OH, OW)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "count_include_pad": self.count_include_pad}

    def _scale(self, xp: Any, x_shape: tuple[int, ...], oh: int, ow: int, dtype: Any) -> Any:
        """1 / divisor: a scalar, or an (OH, OW) array when padding is not counted."""
        kh, kw = self.kernel_size
        if self.count_include_pad or self.padding == (0, 0):
            return 1.0 / (kh * kw)
        key = (tuple(x_shape[2:]), np.dtype(dtype).str, xp.__name__)
        if key in self._scales:
            return self._scales[key]
        counts = []
        for size, out, k, s, p in zip(x_shape[2:], (oh, ow), self.kernel_size, self.stride,
                                      self.padding, strict=True):
            start = np.arange(out) * s - p
            counts.append(np.minimum(start + k, size) - np.maximum(start, 0))
        self._scales = {key: xp.asarray(1.0 / np.outer(counts[0], counts[1]), dtype=dtype)}
        return self._scales[key]

    def forward(self, x: Any) -> Any:
        xp, src, _, out, (oh, ow) = self._reduce(x, "add")
        scale = self._scale(xp, tuple(x.shape), oh, ow, x.dtype)
        xp.multiply(out, scale, out=out)
        self._save(x, src, out, scale=scale)
        return out

    def backward(self, grad_out: Any) -> Any:
        if grad_out is None or not self.input_grad:
            return None
        xp, grad_out, grad_src, grad_win = self._grad_buffers(grad_out)
        scale = self._saved["scale"]
        if self._disjoint():  # scale is a scalar here: one broadcast op
            oh, ow = grad_out.shape[2:]
            xp.multiply(grad_out[:, :, :, None, :, None], scale,
                        out=self._tiles(xp, grad_src, oh, ow))
            return self._unpad(grad_src)
        part = im2col.layout_like(self, "part", grad_out, grad_out.shape, grad_out.dtype, xp)
        xp.multiply(grad_out, scale, out=part)
        for i, j in self._offsets():
            dst = grad_win[..., i, j]
            xp.add(dst, part, out=dst)
        return self._unpad(grad_src)
