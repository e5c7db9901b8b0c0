"""One ONNX converter per distnet layer type, looked up by class name.

A converter is ``fn(ctx, module, x, prefix) -> y``: it adds the nodes computing the
layer in eval mode to ``ctx.g`` and returns the name of its output tensor. ``x`` is
the input tensor's name and ``prefix`` the module's dotted name in the model
(``"3"``, ``"4.conv1"``), which is how parameters are named and how weight
encodings are matched to them. Parameters are added through ``ctx.param``, which
stores a plain float32 initializer or, for an encoded weight, the subgraph that
decodes it, so converters never see compression.

A new layer type becomes exportable with ``@converter("MyLayer")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from compression.fold import fold_pair
from compression.onnx_graph import GraphBuilder
from distnet import backend
from distnet.nn.module import Module


class Context(Protocol):
    """What converters need from the exporter."""

    g: GraphBuilder
    fold_batchnorm: bool

    def param(self, module: Module, prefix: str, attr: str) -> str | None:
        """The tensor holding parameter ``attr`` of ``module`` (None when it is None)."""

    def is_encoded(self, module: Module, prefix: str, attr: str) -> bool:
        """True when parameter ``attr`` has a weight encoding (it cannot be folded)."""


Converter = Callable[[Context, Module, str, str], str]
CONVERTERS: dict[str, Converter] = {}


def converter(*type_names: str) -> Callable[[Converter], Converter]:
    """Register ``fn`` as the converter of the layer classes named ``type_names``."""
    def register(fn: Converter) -> Converter:
        for name in type_names:
            CONVERTERS[name] = fn
        return fn
    return register


def convert(ctx: Context, module: Module, x: str, prefix: str) -> str:
    """Add ``module`` (any registered type, containers included) to the graph."""
    fn = CONVERTERS.get(type(module).__name__)
    if fn is None:
        where = f" at {prefix!r}" if prefix else ""
        raise NotImplementedError(
            f"cannot export {type(module).__name__}{where} to ONNX: no converter "
            f"(supported: {', '.join(sorted(CONVERTERS))})")
    return fn(ctx, module, x, prefix)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _pair(value: Any) -> list[int]:
    """An int or a pair (as a JSON list or tuple) -> [a, b]."""
    if isinstance(value, (list, tuple)):
        a, b = value
        return [int(a), int(b)]
    return [int(value), int(value)]


def _host(array: Any) -> np.ndarray:
    return np.asarray(backend.to_host(array), dtype=np.float32)


# ---- containers ----------------------------------------------------------------------------

def convert_sequence(ctx: Context, items: list[tuple[str, Module]], x: str, prefix: str) -> str:
    """Layers in order; with ``ctx.fold_batchnorm`` a BN right after a dense conv or linear
    layer is folded into that layer's weight and bias (one op fewer, same result)."""
    paths = [(_join(prefix, name), layer) for name, layer in items]
    i = 0
    while i < len(paths):
        path, layer = paths[i]
        if ctx.fold_batchnorm and i + 1 < len(paths) and _foldable(ctx, paths[i], paths[i + 1]):
            x = _affine(ctx, fold_pair(layer, paths[i + 1][1]), x, path)
            i += 2
            continue
        x = convert(ctx, layer, x, path)
        i += 1
    return x


@converter("Sequential")
def _sequential(ctx: Context, module: Module, x: str, prefix: str) -> str:
    return convert_sequence(ctx, list(module._modules.items()), x, prefix)


@converter("ResidualBlock")
def _residual(ctx: Context, module: Module, x: str, prefix: str) -> str:
    branch = [(n, module._modules[n]) for n in ("conv1", "bn1", "relu1", "conv2", "bn2")]
    y = convert_sequence(ctx, branch, x, prefix)
    short = module._modules.get("shortcut")
    s = x if short is None else convert(ctx, short, x, _join(prefix, "shortcut"))
    total = ctx.g.add("Add", [y, s], _join(prefix, "add"))
    return convert(ctx, module._modules["relu2"], total, _join(prefix, "relu2"))


# ---- layers with weights -----------------------------------------------------------------------

_FOLDS_INTO = {"Linear": "BatchNorm1d", "Conv2d": "BatchNorm2d"}  # as compression.fold


def _foldable(ctx: Context, first: tuple[str, Module], second: tuple[str, Module]) -> bool:
    """A (path, layer) pair that is conv/linear then its batch norm, no parameter encoded
    (folding would change an encoded parameter, losing its encoding)."""
    layer, bn = first[1], second[1]
    return (_FOLDS_INTO.get(type(layer).__name__) == type(bn).__name__
            and not any(ctx.is_encoded(m, at, attr) for at, m in (first, second)
                        for attr in ("weight", "bias")))


def _affine(ctx: Context, layer: Module, x: str, prefix: str) -> str:
    """Linear -> Gemm(transB=1); Conv2d -> Conv."""
    w, b = ctx.param(layer, prefix, "weight"), ctx.param(layer, prefix, "bias")
    inputs = [x, w] + ([b] if b is not None else [])
    if type(layer).__name__ == "Linear":
        return ctx.g.add("Gemm", inputs, prefix, transB=1)
    cfg = layer.get_config()
    ph, pw = _pair(cfg.get("padding", 0))
    attrs: dict[str, Any] = {"kernel_shape": list(layer.weight.shape[2:]),
                             "strides": _pair(cfg.get("stride", 1)),
                             "pads": [ph, pw, ph, pw]}
    if "dilation" in cfg:
        attrs["dilations"] = _pair(cfg["dilation"])
    if int(cfg.get("groups", 1)) != 1:
        attrs["group"] = int(cfg["groups"])
    return ctx.g.add("Conv", inputs, prefix, **attrs)


converter("Linear", "Conv2d")(_affine)


@converter("BatchNorm1d", "BatchNorm2d")
def _batchnorm(ctx: Context, module: Module, x: str, prefix: str) -> str:
    inputs = [x, ctx.param(module, prefix, "weight"), ctx.param(module, prefix, "bias"),
              ctx.g.constant(_host(module.running_mean), _join(prefix, "running_mean")),
              ctx.g.constant(_host(module.running_var), _join(prefix, "running_var"))]
    return ctx.g.add("BatchNormalization", inputs, prefix, epsilon=float(module.eps))


# ---- pooling, shape and element-wise layers ------------------------------------------------

def _pool_attrs(module: Module) -> dict[str, Any]:
    cfg = module.get_config()
    kernel = _pair(cfg["kernel_size"])
    stride = cfg.get("stride")
    ph, pw = _pair(cfg.get("padding", 0))
    attrs = {"kernel_shape": kernel, "strides": kernel if stride is None else _pair(stride),
             "pads": [ph, pw, ph, pw]}
    if cfg.get("ceil_mode"):
        attrs["ceil_mode"] = 1
    return attrs


@converter("MaxPool2d")
def _maxpool(ctx: Context, module: Module, x: str, prefix: str) -> str:
    return ctx.g.add("MaxPool", [x], prefix, **_pool_attrs(module))


@converter("AvgPool2d")
def _avgpool(ctx: Context, module: Module, x: str, prefix: str) -> str:
    include = int(bool(module.get_config().get("count_include_pad", True)))
    return ctx.g.add("AveragePool", [x], prefix, count_include_pad=include,
                     **_pool_attrs(module))


@converter("Flatten")
def _flatten(ctx: Context, module: Module, x: str, prefix: str) -> str:
    return ctx.g.add("Flatten", [x], prefix, axis=1)


@converter("Normalize")
def _normalize(ctx: Context, module: Module, x: str, prefix: str) -> str:
    # Sub then Div (not Mul by 1/std) so the graph rounds exactly as distnet does; a
    # mean of 0 or std of 1 adds no node, matching Normalize's own shortcut.
    mean, std = _host(module.mean), _host(module.std)
    if np.any(mean != 0):
        x = ctx.g.add("Sub", [x, ctx.g.constant(mean, _join(prefix, "mean"))], f"{prefix}_sub")
    if np.any(std != 1):
        x = ctx.g.add("Div", [x, ctx.g.constant(std, _join(prefix, "std"))], prefix)
    return x


@converter("Dropout")
def _identity(ctx: Context, module: Module, x: str, prefix: str) -> str:
    return x  # eval mode: dropout is the identity, so no node at all


@converter("ReLU")
def _relu(ctx: Context, module: Module, x: str, prefix: str) -> str:
    return ctx.g.add("Relu", [x], prefix)


@converter("LeakyReLU")
def _leaky_relu(ctx: Context, module: Module, x: str, prefix: str) -> str:
    return ctx.g.add("LeakyRelu", [x], prefix, alpha=float(module.negative_slope))


@converter("Sigmoid")
def _sigmoid(ctx: Context, module: Module, x: str, prefix: str) -> str:
    return ctx.g.add("Sigmoid", [x], prefix)


@converter("Tanh")
def _tanh(ctx: Context, module: Module, x: str, prefix: str) -> str:
    return ctx.g.add("Tanh", [x], prefix)


@converter("Softmax")
def _softmax(ctx: Context, module: Module, x: str, prefix: str) -> str:
    return ctx.g.add("Softmax", [x], prefix, axis=int(module.dim))


@converter("LSTM")
def _lstm(ctx: Context, module: Module, x: str, prefix: str) -> str:
    """One ONNX LSTM node per layer; distnet's gate rows (i, f, g, o) are reordered to
    ONNX's (i, o, f, c) in the graph, so encoded weights stay encoded in the file.

    The nodes run time-major (ONNX Runtime rejects LSTM's batch-first ``layout=1``), so a
    batch-first model gets a Transpose before the first layer and after the last.
    """
    g, hid = ctx.g, module.hidden_size
    block = np.arange(hid, dtype=np.int64)
    order = g.ints(np.concatenate([block + j * hid for j in (0, 3, 1, 2)]), f"{prefix}_gates")
    axis0 = g.ints([0], f"{prefix}_axis0")

    def gates(name: str) -> str:  # rows reordered, with ONNX's leading num_directions axis
        rows = g.add("Gather", [ctx.param(module, prefix, name), order], f"{prefix}.{name}_onnx",
                     axis=0)
        return g.add("Unsqueeze", [rows, axis0], f"{prefix}.{name}_dir")

    if module.batch_first:
        x = g.add("Transpose", [x], f"{prefix}_time_major", perm=[1, 0, 2])
    for k in range(module.num_layers):
        w, r = gates(f"weight_ih_l{k}"), gates(f"weight_hh_l{k}")
        b = g.add("Concat", [gates(f"bias_ih_l{k}"), gates(f"bias_hh_l{k}")], f"{prefix}.b_l{k}",
                  axis=1)
        y = g.add("LSTM", [x, w, r, b], f"{prefix}_l{k}", hidden_size=hid)  # Y: (T, 1, N, H)
        x = g.add("Squeeze", [y, g.ints([1], f"{prefix}_dir_axis")], f"{prefix}_out{k}")
    if module.batch_first:
        x = g.add("Transpose", [x], prefix, perm=[1, 0, 2])
    return x
