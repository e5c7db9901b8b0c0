"""Export a distnet model to ONNX, compressed weights kept compressed, and verify it.

``export_onnx(model, path, input_shape=(1, 28, 28))`` writes a graph whose input
``"input"`` is ``(batch, *input_shape)`` float32, as the data loader yields it (the
model's ``Normalize`` is part of the graph), and whose output is ``"logits"``
(``"probabilities"`` with ``softmax=True``). Every export is checked with
``onnx.checker.check_model(full_check=True)`` and run in ONNX Runtime on a batch of
inputs; the result must match distnet's eval-mode output (rtol 1e-4, atol 1e-5).

Compressed weights are passed as ``weight_encodings={param_name: encoding}``, with
parameter names from ``model.named_parameters()`` (``"2.weight"``); the encoding
types live in ``compression.onnx_encodings`` and are re-exported here:

- ``Shared(codebook, indices)``: weight sharing, ``weight = codebook[indices]``;
  indices narrower than 8 bits are bit-packed in the file.
- ``Int8(q, scale, zero_point, axis)``: linear quantisation, ``(q - zero_point) * scale``,
  per tensor (``axis=None``) or per channel along ``axis``.
- ``Sparse(shape, indices, values)``: a pruned weight, its non-zeros at flat
  ``indices``; ``values`` are float32 or themselves ``Shared``/``Int8`` (pruning plus
  quantisation). Positions are stored as bit-packed gaps, Deep Compression style.

Each encoding must reproduce the model's weight (``encoding.decode()``), so the
exported graph computes exactly what the model does; the opset is 18 by default, the
lowest with every op the decoders use (BitwiseAnd), at the lowest IR version that
carries it (8), so older runtimes load the file too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from compression import onnx_graph as og
from compression.onnx_encodings import (
    Encoding,
    Int8,
    Shared,
    Sparse,
    emit,
    encodings_from_model,
)
from compression.onnx_layers import CONVERTERS, convert
from distnet import backend
from distnet.nn.module import Module

DEFAULT_OPSET = 18
MIN_OPSET = 13  # Softmax/ReduceSum/DequantizeLinear(axis) as used here; packing needs 18
RTOL, ATOL = 1e-4, 1e-5

__all__ = ["Encoding", "ExportError", "ExportResult", "Int8", "ParamReport", "Shared", "Sparse",
           "encodings_from_model", "export_onnx", "reference_output", "run_onnx"]


# ---- the exporter -------------------------------------------------------------------------------

@dataclass
class ParamReport:
    """How one parameter is stored: dense float32 bytes vs bytes in the file."""

    name: str
    shape: tuple[int, ...]
    encoding: str
    dense_bytes: int
    stored_bytes: int


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and how it checked it."""

    path: str | None
    size_bytes: int
    dense_size_bytes: int
    max_abs_diff: float | None
    num_verify_inputs: int
    opset: int
    ir_version: int
    output_name: str
    params: list[ParamReport] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Dense export size / this export's size."""
        return self.dense_size_bytes / self.size_bytes

    def summary(self) -> str:
        lines = [f"{'parameter':<24} {'shape':<18} {'stored as':<46} {'dense':>10} {'file':>10}"]
        for p in self.params:
            lines.append(f"{p.name:<24} {'x'.join(map(str, p.shape)):<18} {p.encoding:<46} "
                         f"{p.dense_bytes:>10,} {p.stored_bytes:>10,}")
        if any(p.encoding != "float32" for p in self.params):
            lines.append(f"size: {self.size_bytes:,} bytes; dense float32 export "
                         f"{self.dense_size_bytes:,} bytes ({self.ratio:.2f}x smaller)")
        else:
            lines.append(f"size: {self.size_bytes:,} bytes (every weight float32)")
        return "\n".join(lines)


class ExportError(RuntimeError):
    """The model cannot be exported, or the export does not reproduce the model."""


class _Exporter:
    """The converters' context: adds parameters, decoding encoded ones in the graph."""

    def __init__(self, encodings: dict[str, Encoding], fold_batchnorm: bool, opset: int) -> None:
        self.g = og.GraphBuilder()
        self.encodings = encodings
        self.fold_batchnorm = fold_batchnorm
        self.opset = opset
        self.reports: list[ParamReport] = []

    def is_encoded(self, module: Module, prefix: str, attr: str) -> bool:
        return (f"{prefix}.{attr}" if prefix else attr) in self.encodings

    def param(self, module: Module, prefix: str, attr: str) -> str | None:
        p = module._parameters.get(attr)
        if p is None:
            return None
        name = f"{prefix}.{attr}" if prefix else attr
        before = self.g.nbytes
        enc = self.encodings.get(name)
        if enc is None:
            out = self.g.constant(np.asarray(backend.to_host(p.data), dtype=np.float32), name)
        else:
            out = emit(self.g, enc, name, self.opset)
        self.reports.append(ParamReport(name, p.shape, "float32" if enc is None
                                        else enc.describe(), 4 * p.size, self.g.nbytes - before))
        return out


# ---- export and verification -------------------------------------------------------------------

def export_onnx(model: Module, path: str | Path | None, *, input_shape: tuple[int, ...],
                weight_encodings: dict[str, Encoding] | None = None,
                opset: int = DEFAULT_OPSET, softmax: bool = False,
                fold_batchnorm: bool = False, verify: bool = True,
                verify_inputs: np.ndarray | None = None,
                rtol: float = RTOL, atol: float = ATOL) -> ExportResult:
    """Write ``model`` (in eval mode) as ONNX to ``path`` and check it; returns the sizes.

    input_shape: one example's shape, e.g. (C, H, W); the graph input is ``(batch,
    *input_shape)`` float32. weight_encodings: compressed forms of parameters, by
    name (see the module docstring). softmax: append Softmax(axis=1) and name the
    output "probabilities". fold_batchnorm: fold each BatchNorm that follows a
    conv/linear layer with a plain float weight into that layer.
    verify_inputs: (N, *input_shape) float32, a batch of real inputs; default 16
    uniform random ones in [0, 1). With ``verify`` (the default) ONNX Runtime's output
    must equal distnet's within ``rtol``/``atol``, else ExportError (nothing written).
    The model's train/eval mode is left as it was. ``path=None`` writes nothing.
    """
    if not MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise ValueError(f"opset {opset} is not supported: choose {MIN_OPSET} to "
                         f"{onnx.defs.onnx_opset_version()} (default {DEFAULT_OPSET})")
    input_shape = tuple(int(d) for d in input_shape)
    encodings = _checked_encodings(model, dict(weight_encodings or {}))
    x = _verify_batch(verify_inputs, input_shape)
    expected = reference_output(model, x, softmax)

    build = dict(input_shape=input_shape, output_shape=expected.shape[1:], opset=opset,
                 softmax=softmax, fold_batchnorm=fold_batchnorm)
    proto, reports = _build_model(model, encodings, **build)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph is not valid ONNX: {exc}") from None
    diff = None
    if verify:
        got = run_onnx(proto, x)
        diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=rtol, atol=atol):
            raise ExportError(f"ONNX Runtime does not reproduce the model: output "
                              f"{got.shape} vs {expected.shape}, max abs diff {diff:.3g} "
                              f"(rtol {rtol}, atol {atol}); nothing written")
        helper.set_model_props(proto, {**_props(proto), "distnet.verified": json.dumps(
            {"runtime": f"onnxruntime {_ort().__version__}", "inputs": int(x.shape[0]),
             "max_abs_diff": diff})})
    data = proto.SerializeToString()
    dense = len(data) if not encodings else _build_model(model, {}, **build)[0].ByteSize()
    if path is not None:
        Path(path).write_bytes(data)
    return ExportResult(path=None if path is None else str(path), size_bytes=len(data),
                        dense_size_bytes=dense, max_abs_diff=diff,
                        num_verify_inputs=int(x.shape[0]), opset=opset,
                        ir_version=proto.ir_version, output_name=proto.graph.output[0].name,
                        params=reports)


def reference_output(model: Module, x: np.ndarray, softmax: bool = False) -> np.ndarray:
    """distnet's eval-mode output for host batch ``x`` (float32, on the host), mode restored."""
    from distnet.nn.activation import Softmax

    modes = [(m, m.training) for _, m in model.named_modules()]
    model.eval()
    try:
        out = model.forward(backend.to_device(x, model.device))
        if softmax and not _ends_with_softmax(model):
            out = Softmax(dim=1).forward(out)
        return np.array(backend.to_host(out), dtype=np.float32)  # a copy: out may be a workspace
    finally:
        for m, mode in modes:
            object.__setattr__(m, "training", mode)


def run_onnx(model: onnx.ModelProto | str | Path, x: np.ndarray) -> np.ndarray:
    """Run an ONNX model (proto or file) on ``x`` with ONNX Runtime's CPU provider."""
    ort = _ort()
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("verifying an export needs onnxruntime (pip install onnxruntime, "
                          "or install distnet's 'verify' extra); verify=False skips it") from None
    return onnxruntime


def _ends_with_softmax(model: Module) -> bool:
    layers = list(model._modules.values())
    return type(layers[-1] if layers else model).__name__ == "Softmax"


def _verify_batch(x: np.ndarray | None, input_shape: tuple[int, ...]) -> np.ndarray:
    if x is None:
        # Uniform in [0, 1): the range the data loader yields, so Normalize sees real-ish values.
        return np.random.default_rng(0).random((16, *input_shape), dtype=np.float32)
    x = np.asarray(backend.to_host(x), dtype=np.float32)
    if x.shape[1:] != input_shape or x.shape[0] < 1:
        raise ValueError(f"verify_inputs must have shape (N, {', '.join(map(str, input_shape))})"
                         f", got {x.shape}")
    return x


def _checked_encodings(model: Module, encodings: dict[str, Encoding]) -> dict[str, Encoding]:
    """Each encoding must name a parameter and decode to its current value."""
    params = dict(model.named_parameters())
    unknown = sorted(set(encodings) - set(params))
    if unknown:
        raise ValueError(f"weight encodings for unknown parameters {unknown}: names come from "
                         f"model.named_parameters(), e.g. {next(iter(params), '0.weight')!r}")
    for name, enc in encodings.items():
        if not isinstance(enc, (Shared, Int8, Sparse)):
            raise TypeError(f"{name}: encoding must be Shared, Int8 or Sparse, "
                            f"got {type(enc).__name__}")
        w = np.asarray(backend.to_host(params[name].data), dtype=np.float32)
        if tuple(enc.shape) != w.shape:
            raise ValueError(f"{name}: encoding has shape {tuple(enc.shape)}, weight {w.shape}")
        err = float(np.max(np.abs(enc.decode() - w))) if w.size else 0.0
        if err > 1e-6 * max(1.0, float(np.max(np.abs(w)))):
            raise ValueError(f"{name}: the encoding does not reproduce the model's weight (max "
                             f"abs diff {err:.3g}); load its decoded values into the model "
                             f"first (param.data[...] = encoding.decode())")
    return encodings


def _build_model(model: Module, encodings: dict[str, Encoding], *, input_shape: tuple[int, ...],
                 output_shape: tuple[int, ...], opset: int, softmax: bool,
                 fold_batchnorm: bool) -> tuple[onnx.ModelProto, list[ParamReport]]:
    ctx = _Exporter(encodings, fold_batchnorm, opset)
    ctx.g.fresh("input")
    y = convert(ctx, model, "input", "")
    out_name = "logits"
    if softmax:
        out_name = "probabilities"
        if not _ends_with_softmax(model):
            y = ctx.g.add("Softmax", [y], "softmax", axis=1)
    if y == "input":  # an empty model: ONNX needs a node between input and output
        y = ctx.g.add("Identity", [y], "identity")
    ctx.g.rename(y, out_name)
    unused = sorted(set(encodings) - {r.name for r in ctx.reports})
    if unused:  # a converter that bypassed ctx.param would silently drop them
        raise ExportError(f"weight encodings for {unused} were not used by the export")
    shared = {n: enc.describe() for n, enc in encodings.items()}
    stored = sum(r.stored_bytes for r in ctx.reports)
    dense = sum(r.dense_bytes for r in ctx.reports)
    metadata = {
        "distnet.spec": json.dumps(model.to_spec()),
        "distnet.input_shape": json.dumps(list(input_shape)),
        "distnet.compression": json.dumps({"encodings": shared, "weights_bytes": stored,
                                           "dense_weights_bytes": dense,
                                           "folded_batchnorm": fold_batchnorm}),
    }
    doc = (f"distnet {type(model).__name__} ({_layer_summary(model)}); "
           f"{model.num_parameters():,} parameters, "
           + (f"{len(encodings)} compressed ({', '.join(sorted(set(shared.values())))}); "
              if encodings else "all float32; ")
           + f"input (batch, {', '.join(map(str, input_shape))}) float32 in [0, 1].")
    from distnet import __version__

    value = helper.make_tensor_value_info
    proto = ctx.g.model(
        [value("input", TensorProto.FLOAT, ["batch", *input_shape])],
        [value(out_name, TensorProto.FLOAT, ["batch", *output_shape])],
        opset=opset, ir_version=_ir_version(opset), graph_name="distnet", doc=doc,
        metadata=metadata, producer_version=__version__)
    return proto, ctx.reports


def _ir_version(opset: int) -> int:
    """The lowest IR version that can carry ``opset``, so older runtimes load the file."""
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])


def _layer_summary(model: Module) -> str:
    layers = list(model._modules.values()) or [model]
    return ", ".join(type(m).__name__ for m in layers)


def _props(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


SUPPORTED_LAYERS = tuple(sorted(CONVERTERS))
