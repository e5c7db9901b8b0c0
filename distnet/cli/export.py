"""Export a model to ONNX, compressed weights kept compressed, verified with ONNX Runtime.

The graph takes what the data loader yields, ``input`` (batch, C, H, W) float32 in
[0, 1] (the model's Normalize is in the graph), and returns ``logits`` (or
``probabilities`` with --softmax). Compressed weights stay compressed in the file:
pruned ones as sparse positions, shared ones as a codebook and packed indices,
linearly quantised ones as int8 codes, whether they come from a .dcz or a
checkpoint (--dense stores plain float32). The export is run in ONNX Runtime on
real inputs and must match distnet's output; the size is reported against a
plain float32 export.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

EXAMPLES = """\
  distnet export --checkpoint lenet300.npz --out lenet300.onnx
  distnet export --model lenet300.dcz --out lenet300.onnx --softmax
  distnet export --model lenet300.dcz --out dense.onnx --dense --opset 21
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training checkpoint (.npz)")
    source.add_argument("--model", help="compressed model (.dcz)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--softmax", action="store_true",
                   help="end with Softmax: output 'probabilities' instead of 'logits'")
    p.add_argument("--dense", action="store_true",
                   help="store every weight as plain float32 (no codebooks, int8, sparsity)")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 18; 13-17 store sub-8-bit indices unpacked)")
    p.add_argument("--fold-bn", action="store_true",
                   help="fold batch norms into the preceding conv/linear layer where possible")
    p.add_argument("--data", default=None,
                   help="data to verify on: digits | mnist:DIR | synthetic[:N] "
                        "(default: the model's own data; random inputs if unavailable)")
    p.add_argument("--input-shape", default=None, metavar="C,H,W",
                   help="one input's shape (default: recorded with the model)")
    p.add_argument("--verify-batch", type=int, default=64,
                   help="inputs compared between distnet and ONNX Runtime (default 64)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the ONNX Runtime check (when onnxruntime is not installed)")


def load_for_export(path: str, dense: bool, opset: int = 18
                    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(model, meta, weight encodings) from a checkpoint (.npz) or a compressed file (.dcz).

    A .dcz that supplies ONNX encodings (``LoadedDcz.encodings``) is taken at its word;
    otherwise each weight's compact form (sparse, shared, both) is found from its values,
    which is lossless, so pruned or weight-shared checkpoints export small too.
    """
    from compression.onnx_export import encodings_from_model

    if path.endswith(".dcz"):
        from compression.dcz import load_dcz

        loaded = load_dcz(path)
        model, meta = loaded.model, dict(loaded.meta or {})
        given = dict(getattr(loaded, "encodings", None) or {})
    else:
        from distnet.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        model, meta, given = ckpt.model, dict(ckpt.meta or {}), {}
    if dense:
        return model, meta, {}
    return model, meta, {**encodings_from_model(model, opset), **given}


def input_shape_of(meta: dict[str, Any], given: str | None) -> tuple[int, ...]:
    if given:
        try:
            return tuple(int(d) for d in given.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise ValueError(f"--input-shape must look like 1,28,28, got {given!r}") from None
    shape = (meta.get("data") or {}).get("input_shape") or meta.get("input_shape")
    if not shape:
        raise ValueError("the model does not record its input shape: give --input-shape C,H,W")
    return tuple(int(d) for d in shape)


def verify_batch(meta: dict[str, Any], spec: str | None, shape: tuple[int, ...],
                 n: int) -> tuple[np.ndarray, str]:
    """Up to ``n`` validation inputs of the model's data, else uniform random ones."""
    from distnet.data import load_data

    config = meta.get("config") or {}
    candidates = [spec] if spec else [config.get("data"), (meta.get("data") or {}).get("source")]
    for candidate in filter(None, candidates):
        try:  # the training run's split, so these are inputs the model did not train on
            _, val, info = load_data(candidate, val_size=config.get("val_size"),
                                     seed=int(config.get("seed") or 0))
        except (ValueError, OSError):
            if spec:  # the user named it: a failure is theirs to see
                raise
            continue
        x = np.asarray(val.x[:n], dtype=np.float32)
        if x.shape[1:] == shape and len(x):
            return x, f"{len(x)} {info.get('name', candidate)} validation inputs"
    rng = np.random.default_rng(0)
    return rng.random((n, *shape), dtype=np.float32), f"{n} random inputs in [0, 1)"


def run(args: argparse.Namespace) -> int:
    from compression.onnx_export import DEFAULT_OPSET, export_onnx

    path = args.model or args.checkpoint
    if args.verify_batch < 1:
        raise ValueError("--verify-batch must be at least 1")
    opset = args.opset or DEFAULT_OPSET
    model, meta, encodings = load_for_export(path, args.dense, opset)
    shape = input_shape_of(meta, args.input_shape)
    x, described = verify_batch(meta, args.data, shape, args.verify_batch)
    result = export_onnx(model, args.out, input_shape=shape, weight_encodings=encodings,
                         opset=opset, softmax=args.softmax,
                         fold_batchnorm=args.fold_bn, verify=not args.no_verify,
                         verify_inputs=x)
    print(f"wrote {args.out}: opset {result.opset}, IR version {result.ir_version}, "
          f"input 'input' (batch, {', '.join(map(str, shape))}), "
          f"output '{result.output_name}'")
    print(result.summary())
    if result.max_abs_diff is None:
        print("not verified (--no-verify)")
    else:
        print(f"verified: onnxruntime matches distnet (max abs diff {result.max_abs_diff:.3g} "
              f"on {described})")
    return 0
