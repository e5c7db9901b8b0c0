"""The fully connected layer, and switching off the input gradient of a model's first layers."""

from __future__ import annotations

import math
from typing import Any

from distnet import backend
from distnet.nn import init
from distnet.nn.module import Module, Parameter


class Linear(Module):
    """``y = x @ weight.T + bias``.

    x: (N, in_features) float32 -> y: (N, out_features) float32.
    weight: (out_features, in_features) (PyTorch's layout, so ONNX Gemm uses transB=1),
    bias: (out_features,). Default init is PyTorch's: kaiming-uniform with
    ``a=sqrt(5)`` (bound ``1/sqrt(in_features)``) and a uniform bias with the same bound.

    ``input_grad = False`` makes backward skip d loss / d x and return ``None``: a
    model's first layer never needs it, and for LeNet-300-100 it is a third of the
    backward FLOPs (see ``skip_input_grad``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 seed: int | None = None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear({in_features}, {out_features}): sizes must be positive")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.seed = seed
        self.input_grad = True
        rng = init.as_generator(seed)
        shape = (self.out_features, self.in_features)
        self.weight = Parameter(init.kaiming_uniform(shape, a=math.sqrt(5), rng=rng))
        if bias:
            bound = 1.0 / math.sqrt(self.in_features)
            self.bias = Parameter(init.uniform(self.out_features, bound, rng))
        else:
            self.bias = None
        self._x: Any = None

    def get_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "seed": self.seed}

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"

    def forward(self, x: Any) -> Any:
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear({self.in_features}, {self.out_features}): expected input "
                             f"(N, {self.in_features}), got {tuple(x.shape)}")
        xp = backend.get_array_module(x)
        w = self.weight.data
        out = self.workspace("out", (x.shape[0], self.out_features),
                             xp.result_type(x.dtype, w.dtype), xp)
        # w.T is an F-ordered view: BLAS reads it transposed, nothing is copied.
        xp.matmul(x, w.T, out=out)
        if self.bias is not None:
            xp.add(out, self.bias.data, out=out)
        self._x = x
        return out

    def backward(self, grad_out: Any) -> Any:
        x = self._x
        if x is None:
            raise RuntimeError("Linear.backward called before forward")
        xp = backend.get_array_module(grad_out)
        xp.matmul(grad_out.T, x, out=self.weight.grad)
        if self.bias is not None:
            grad_out.sum(axis=0, out=self.bias.grad)
        if not self.input_grad:
            return None
        w = self.weight.data
        grad_in = self.workspace("grad_in", x.shape, xp.result_type(grad_out.dtype, w.dtype), xp)
        return xp.matmul(grad_out, w, out=grad_in)


def skip_input_grad(model: Module) -> list[str]:
    """Stop backward at the data: the leading layers of ``model`` return ``None`` as grad_in.

    Walks a ``Sequential`` from its first layer, setting ``input_grad = False`` on
    each layer that supports it, up to and including the first layer with
    parameters (whose weight gradients are still computed). Stops early at a layer
    without ``input_grad``. Returns the names of the layers changed. Use it on
    models trained on data; leave it off when the gradient w.r.t. the input is
    wanted (saliency, adversarial examples, gradient checks).
    """
    changed: list[str] = []
    layers = list(model._modules.items()) if model._modules else [("", model)]
    for name, layer in layers:
        if not hasattr(layer, "input_grad"):
            break
        layer.input_grad = False
        changed.append(name)
        if layer._parameters:
            break
    return changed
