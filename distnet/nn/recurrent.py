"""A multi-layer LSTM with backpropagation through time."""

from __future__ import annotations

import math
from typing import Any

from distnet import backend
from distnet.nn import init
from distnet.nn.module import Module, Parameter


def _sigmoid_(a: Any, xp: Any) -> None:
    """In-place logistic function as ``(1 + tanh(a / 2)) / 2``: no exp overflow."""
    a *= 0.5
    xp.tanh(a, out=a)
    a += 1
    a *= 0.5


class LSTM(Module):
    """Long short-term memory over a whole sequence, zero initial state.

    x: (N, T, input_size) float32 (``(T, N, input_size)`` with ``batch_first=False``)
    -> output: (N, T, hidden_size), the last layer's hidden state at every step.
    Parameters use PyTorch's names and gate layout (input, forget, cell, output):
    ``weight_ih_l{k}`` (4H, F_k), ``weight_hh_l{k}`` (4H, H), ``bias_ih_l{k}`` and
    ``bias_hh_l{k}`` (4H,), all initialised U(-1/sqrt(H), 1/sqrt(H)).

    Internally everything is time-major (T, N, ...) so each step's slice is
    contiguous and the weight gradients are single matmuls over all steps.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 batch_first: bool = True, seed: int | None = None) -> None:
        super().__init__()
        if min(input_size, hidden_size, num_layers) < 1:
            raise ValueError(f"LSTM({input_size}, {hidden_size}, num_layers={num_layers}): "
                             "sizes must be positive")
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.num_layers, self.batch_first, self.seed = int(num_layers), bool(batch_first), seed
        rng = init.as_generator(seed)
        h, bound = self.hidden_size, 1.0 / math.sqrt(self.hidden_size)
        for k in range(self.num_layers):
            fan = self.input_size if k == 0 else h
            setattr(self, f"weight_ih_l{k}", Parameter(init.uniform((4 * h, fan), bound, rng)))
            setattr(self, f"weight_hh_l{k}", Parameter(init.uniform((4 * h, h), bound, rng)))
            setattr(self, f"bias_ih_l{k}", Parameter(init.uniform(4 * h, bound, rng)))
            setattr(self, f"bias_hh_l{k}", Parameter(init.uniform(4 * h, bound, rng)))
        self._inputs: list[Any] | None = None

    def get_config(self) -> dict[str, Any]:
        return {"input_size": self.input_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "batch_first": self.batch_first,
                "seed": self.seed}

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}")

    def _params(self, k: int) -> tuple[Parameter, Parameter, Parameter, Parameter]:
        p = self._parameters
        return p[f"weight_ih_l{k}"], p[f"weight_hh_l{k}"], p[f"bias_ih_l{k}"], p[f"bias_hh_l{k}"]

    def forward(self, x: Any) -> Any:
        if x.ndim != 3 or x.shape[2] != self.input_size:
            layout = "N, T" if self.batch_first else "T, N"
            raise ValueError(f"LSTM({self.input_size}, {self.hidden_size}): expected input "
                             f"({layout}, {self.input_size}), got {tuple(x.shape)}")
        xp = backend.get_array_module(x)
        dtype = xp.result_type(x.dtype, self._params(0)[0].data.dtype)
        seq = x.transpose(1, 0, 2) if self.batch_first else x
        inp = self.workspace("x", seq.shape, dtype, xp)
        inp[...] = seq  # time-major and contiguous, read again by backward
        self._inputs = []
        for k in range(self.num_layers):
            self._inputs.append(inp)
            inp = self._forward_layer(k, inp, xp)
        return inp.transpose(1, 0, 2) if self.batch_first else inp

    def _forward_layer(self, k: int, inp: Any, xp: Any) -> Any:
        w_ih, w_hh, b_ih, b_hh = (p.data for p in self._params(k))
        steps, n, _ = inp.shape
        hid, dtype = self.hidden_size, inp.dtype
        ws = self.workspace
        acts = ws(f"acts{k}", (steps, n, 4 * hid), dtype, xp)  # gate activations i, f, g, o
        h = ws(f"h{k}", (steps + 1, n, hid), dtype, xp)  # h[t] is the state before step t
        c = ws(f"c{k}", (steps + 1, n, hid), dtype, xp)
        tanh_c = ws(f"tanh_c{k}", (steps, n, hid), dtype, xp)
        xw = ws(f"xw{k}", (steps, n, 4 * hid), dtype, xp)
        tmp = ws("tmp", (n, hid), dtype, xp)
        # The input projection of all steps at once: one large matmul instead of T small ones.
        xp.matmul(inp.reshape(steps * n, -1), w_ih.T, out=xw.reshape(steps * n, 4 * hid))
        xw += b_ih
        xw += b_hh
        h[0] = 0
        c[0] = 0
        for t in range(steps):
            a = acts[t]
            xp.matmul(h[t], w_hh.T, out=a)
            a += xw[t]
            i, f, g, o = a[:, :hid], a[:, hid:2 * hid], a[:, 2 * hid:3 * hid], a[:, 3 * hid:]
            _sigmoid_(a[:, :2 * hid], xp)
            xp.tanh(g, out=g)
            _sigmoid_(o, xp)
            xp.multiply(f, c[t], out=c[t + 1])
            c[t + 1] += xp.multiply(i, g, out=tmp)
            xp.tanh(c[t + 1], out=tanh_c[t])
            xp.multiply(o, tanh_c[t], out=h[t + 1])
        return h[1:]

    def backward(self, grad_out: Any) -> Any:
        if self._inputs is None:
            raise RuntimeError("LSTM.backward called before forward")
        grad = grad_out.transpose(1, 0, 2) if self.batch_first else grad_out
        for k in reversed(range(self.num_layers)):
            grad = self._backward_layer(k, grad, backend.get_array_module(grad_out))
        return grad.transpose(1, 0, 2) if self.batch_first else grad

    def _backward_layer(self, k: int, grad_h: Any, xp: Any) -> Any:
        p_ih, p_hh, b_ih, b_hh = self._params(k)
        inp, ws, hid = self._inputs[k], self.workspace, self.hidden_size
        acts, h, c, tanh_c = (self._workspace[f"{key}{k}"] for key in ("acts", "h", "c", "tanh_c"))
        steps, n, feat = inp.shape
        dtype = acts.dtype
        dacts = ws(f"dacts{k}", acts.shape, dtype, xp)  # d loss / d gate pre-activations
        dh = ws("dh", (n, hid), dtype, xp)  # flows back from step t+1 through w_hh
        dc = ws("dc", (n, hid), dtype, xp)  # flows back from step t+1 through the forget gate
        tmp = ws("tmp", (n, hid), dtype, xp)
        dh[...] = 0
        dc[...] = 0
        for t in reversed(range(steps)):
            a, da = acts[t], dacts[t]
            i, f, g, o = a[:, :hid], a[:, hid:2 * hid], a[:, 2 * hid:3 * hid], a[:, 3 * hid:]
            di, df, dg, do = (da[:, j * hid:(j + 1) * hid] for j in range(4))
            dh += grad_h[t]
            # h = o * tanh(c): to the output gate, and into the cell on top of dc from t+1.
            xp.multiply(tanh_c[t], tanh_c[t], out=tmp)
            xp.subtract(1, tmp, out=tmp)
            tmp *= o
            tmp *= dh
            dc += tmp
            xp.multiply(dh, tanh_c[t], out=do)
            xp.subtract(1, o, out=tmp)
            tmp *= o
            do *= tmp
            # c = f * c_prev + i * g.
            xp.multiply(dc, g, out=di)
            xp.subtract(1, i, out=tmp)
            tmp *= i
            di *= tmp
            xp.multiply(dc, c[t], out=df)
            xp.subtract(1, f, out=tmp)
            tmp *= f
            df *= tmp
            xp.multiply(dc, i, out=dg)
            xp.multiply(g, g, out=tmp)
            xp.subtract(1, tmp, out=tmp)
            dg *= tmp
            dc *= f
            xp.matmul(da, p_hh.data, out=dh)
        flat = dacts.reshape(steps * n, 4 * hid)
        xp.matmul(flat.T, inp.reshape(steps * n, feat), out=p_ih.grad)
        xp.matmul(flat.T, h[:steps].reshape(steps * n, hid), out=p_hh.grad)
        flat.sum(axis=0, out=b_ih.grad)
        xp.copyto(b_hh.grad, b_ih.grad)
        grad_in = ws(f"grad_in{k}", inp.shape, dtype, xp)
        xp.matmul(flat, p_ih.data, out=grad_in.reshape(steps * n, feat))
        return grad_in
