"""2-D convolution: (row-blocked) im2col and one GEMM per pass, in NHWC memory order."""

from __future__ import annotations

import math
from typing import Any

from distnet import backend
from distnet.nn import im2col
from distnet.nn.init import as_generator, kaiming_uniform, uniform
from distnet.nn.module import Module, Parameter


class Conv2d(Module):
    """Cross-correlation as PyTorch's ``nn.Conv2d`` (no dilation or groups).

    x: (N, in_channels, H, W) -> y: (N, out_channels, OH, OW), with
    ``OH = (H + 2*ph - kh) // sh + 1``. weight: (out_channels, in_channels, kh, kw),
    bias: (out_channels,); both start as PyTorch's (kaiming-uniform with ``a=sqrt(5)``,
    bound ``1/sqrt(fan_in)``). ``kernel_size``/``stride``/``padding``: int or (h, w).

    Memory layout: the layer computes in NHWC order (channels innermost), where a
    patch row is one contiguous run, so im2col is one strided copy and every GEMM
    reads plain matrices. ``y`` is an (N, C, OH, OW) *view* of an NHWC workspace
    (``y.transpose(0, 2, 3, 1)`` is contiguous); the gradient returned by backward
    is likewise an NCHW view of NHWC memory. Inputs may have any strides; NHWC
    ones (the output of another Conv2d or a pooling layer after it) are read in
    place. The bias rides along in the GEMMs as an extra column of ones, so its
    gradient comes out of the weight-gradient GEMM. See ``distnet.nn.im2col`` for
    the row-blocked form used where it is cheaper (small ``in_channels``, col2im).

    ``input_grad = False`` makes backward skip d loss / d x (a GEMM and col2im) and
    return ``None``: the first layer of a model never needs it
    (``distnet.nn.skip_input_grad(model)`` sets it). The default computes it.
    ``blocks = (B_forward, B_input_grad)`` pins the im2col block sizes (each must
    divide OW; 1 = plain im2col); ``None`` picks them with a cost model.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, bias: bool = True, seed: int | None = None) -> None:
        super().__init__()
        name = f"Conv2d({in_channels}, {out_channels})"
        if int(in_channels) < 1 or int(out_channels) < 1:
            raise ValueError(f"{name}: channel counts must be positive")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = im2col.pair(kernel_size, "kernel_size", name, 1)
        self.stride = im2col.pair(stride, "stride", name, 1)
        self.padding = im2col.pair(padding, "padding", name, 0)
        self.seed = seed
        self.input_grad = True
        self.blocks: tuple[int, int] | None = None
        rng = as_generator(seed)
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        self.weight = Parameter(kaiming_uniform(shape, a=math.sqrt(5), rng=rng))
        if bias:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            self.bias = Parameter(uniform(self.out_channels, 1.0 / math.sqrt(fan_in), rng))
        else:
            self.bias = None
        self._saved: dict[str, Any] | None = None
        self._block_cache: dict[tuple[int, ...], tuple[int, int]] = {}

    def get_config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": im2col.as_config(self.kernel_size),
                "stride": im2col.as_config(self.stride),
                "padding": im2col.as_config(self.padding),
                "bias": self.bias is not None, "seed": self.seed}

    def extra_repr(self) -> str:
        cfg = self.get_config()
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={cfg['kernel_size']}, "
                f"stride={cfg['stride']}, padding={cfg['padding']}, bias={cfg['bias']}")

    def _name(self) -> str:
        return f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size=" \
               f"{im2col.as_config(self.kernel_size)})"

    def _choose_blocks(self, n: int, oh: int, ow: int) -> tuple[int, int]:
        if self.blocks is not None:
            bf, bb = (int(b) for b in self.blocks)
            if ow % bf or ow % bb:
                raise ValueError(f"{self._name()}: blocks {self.blocks} must divide OW={ow}")
            return bf, bb
        key = (n, oh, ow)
        if key not in self._block_cache:
            args = (n * oh, ow, self.out_channels, self.in_channels, self.kernel_size,
                    self.stride[1])
            self._block_cache[key] = (im2col.choose_block(*args, backward=False),
                                      im2col.choose_block(*args, backward=True))
        return self._block_cache[key]

    def _banded(self, key: str, b: int, dtype: Any, xp: Any, with_bias: bool) -> Any:
        """M (B*O, KH*L*C [+1]): the weights on their band, zeros elsewhere (see im2col)."""
        o, c = self.out_channels, self.in_channels
        kh, kw = self.kernel_size
        length = (b - 1) * self.stride[1] + kw
        k = kh * length * c
        m, _ = im2col.fresh_workspace(self, key, (b * o, k + with_bias), dtype, xp)
        xp.copyto(self._band(xp, m, b), self.weight.data.transpose(0, 2, 3, 1)[None])
        if with_bias:
            xp.copyto(self._bias_part(xp, m, b), self.bias.data[None])
        return m

    def _band(self, xp: Any, m: Any, b: int) -> Any:
        """The (B, O, KH, KW, C) band view of a banded matrix ``m`` (B*O, KH*L*C [+1]).

        ``m`` may have any strides (e.g. the transpose of a GEMM output).
        """
        o, c = self.out_channels, self.in_channels
        kh, kw = self.kernel_size
        length = (b - 1) * self.stride[1] + kw
        s0, s1 = m.strides
        m5 = im2col.as_strided(xp, m, (b, o, kh, length, c),
                               (o * s0, s0, length * c * s1, c * s1, s1))
        return im2col.band(xp, m5, self.stride[1], kw)

    def _bias_part(self, xp: Any, m: Any, b: int) -> Any:
        """The last column of ``m`` (B*O, K+1) as (B, O)."""
        s0 = m.strides[0]
        return im2col.as_strided(xp, m[:, m.shape[1] - 1:], (b, self.out_channels),
                                 (self.out_channels * s0, s0))

    def forward(self, x: Any) -> Any:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self._name()}: expected input (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        n, c = x.shape[:2]
        oh, ow = im2col.output_size(self._name(), x.shape, self.kernel_size, self.stride,
                                    self.padding)
        xp = backend.get_array_module(x)
        dtype = xp.result_type(x.dtype, self.weight.data.dtype)
        kh, kw = self.kernel_size
        o, with_bias = self.out_channels, self.bias is not None
        b, _ = self._choose_blocks(n, oh, ow)
        length = (b - 1) * self.stride[1] + kw
        k = kh * length * c
        src = im2col.nhwc_source(self, x, self.padding, dtype, xp)
        rows = n * oh * (ow // b)
        # Fill value 1: the last column stays 1 and multiplies the bias.
        cols, _ = im2col.fresh_workspace(self, "cols", (rows, k + with_bias), dtype, xp, fill=1)
        rs, e = cols.strides
        patches = im2col.as_strided(xp, cols, (n, oh, ow // b, kh, length, c),
                                    (oh * (ow // b) * rs, (ow // b) * rs, rs,
                                     length * c * e, c * e, e))
        im2col.fill_columns(xp, src, patches, self.kernel_size, self.stride, b)
        m = self._banded("m", b, dtype, xp, with_bias)
        out = self.workspace("out", (rows, b * o), dtype, xp)
        xp.matmul(cols, m.T, out=out)
        self._saved = {"x_shape": tuple(x.shape), "src_shape": tuple(src.shape), "cols": cols,
                       "m": m, "b": b, "k": k, "dtype": dtype, "out_shape": (n, o, oh, ow)}
        return out.reshape(n, oh, ow, o).transpose(0, 3, 1, 2)

    def backward(self, grad_out: Any) -> Any:
        saved = self._saved
        if saved is None:
            raise RuntimeError("Conv2d.backward called before forward")
        if grad_out is None or tuple(grad_out.shape) != saved["out_shape"]:
            got = None if grad_out is None else tuple(grad_out.shape)
            raise ValueError(f"{self._name()}: backward expected grad_out "
                             f"{saved['out_shape']} (the forward output's shape), got {got}")
        xp = backend.get_array_module(grad_out)
        dtype, cols, b, k = saved["dtype"], saved["cols"], saved["b"], saved["k"]
        n, o, oh, ow = saved["out_shape"]
        kh, kw = self.kernel_size
        c, with_bias = self.in_channels, self.bias is not None
        g = grad_out.transpose(0, 2, 3, 1)  # (N, OH, OW, O): a plain matrix when NHWC in memory
        if not g.flags.c_contiguous or g.dtype != dtype:
            buf = self.workspace("g", g.shape, dtype, xp)
            xp.copyto(buf, g)
            g = buf

        # Weight (and bias) gradient: one GEMM, then sum the B bands of the banded matrix.
        gm = self.workspace("gm", (b * o, k + with_bias), dtype, xp)
        xp.matmul(g.reshape(-1, b * o).T, cols, out=gm)
        xp.sum(self._band(xp, gm, b), axis=0, out=self.weight.grad.transpose(0, 2, 3, 1))
        if with_bias:
            xp.sum(self._bias_part(xp, gm, b), axis=0, out=self.bias.grad)
        if not self.input_grad:
            return None

        # Input gradient: one GEMM with the banded weights, then col2im.
        bb = self._choose_blocks(n, oh, ow)[1]
        lb = (bb - 1) * self.stride[1] + kw
        m = saved["m"] if bb == b else self._banded("m_grad", bb, dtype, xp, False)
        t = self.workspace("t", (n * oh * (ow // bb), kh * lb * c), dtype, xp)
        xp.matmul(g.reshape(-1, bb * o), m[:, :kh * lb * c], out=t)
        grad_src = self.workspace("grad_src", saved["src_shape"], dtype, xp)
        grad_src.fill(0)
        im2col.add_columns(xp, t.reshape(n, oh, ow // bb, kh, lb * c), grad_src,
                           self.kernel_size, self.stride, bb)
        _, _, h, w = saved["x_shape"]
        ph, pw = self.padding
        return grad_src[:, ph:ph + h, pw:pw + w, :].transpose(0, 3, 1, 2)
