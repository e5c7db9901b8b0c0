"""Compress a trained model: prune, retrain, share weights, fine-tune, Huffman-code (.dcz).

Deep Compression (Han, Mao and Dally 2016) as one command. Each stage is optional
and its effect on accuracy and file size is reported. Layer keys in the specs:
the Sequential index (2), the parameter name (2.weight), #k (k-th prunable weight)
or fcN / convN (1-based, as the papers name LeNet's layers). --sensitivity scans
accuracy against per-layer sparsity and proposes a --prune spec instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXAMPLES = """\
  distnet compress --checkpoint lenet300.npz --prune fc1:0.95,fc2:0.9,fc3:0.75 \\
      --retrain-epochs 30 --share-bits fc=5,fc1=4 --finetune-epochs 5 --out lenet300.dcz
  distnet compress --checkpoint lenet5.npz --prune q=1.0 --share-bits conv=8,fc=5 \\
      --retrain-epochs 20 --out lenet5.dcz --report report.json --figure fc1.png
  distnet compress --checkpoint lenet300.npz --quantize int8 --per-channel --out int8.dcz
  distnet compress --checkpoint lenet300.npz --lowrank 2:ratio=0.25 --lowrank-epochs 5
  distnet compress --checkpoint lenet300.npz --sensitivity --tolerance 0.5
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--checkpoint", required=True, help="trained model (.npz from distnet train)")
    g.add_argument("--data", default=None, help="digits | mnist:DIR | synthetic[:N] "
                   "(default: the checkpoint's data)")
    g.add_argument("--val-size", type=int, default=None)
    g.add_argument("--device", default=None, help="cpu | cuda")
    g = p.add_argument_group("stages")
    g.add_argument("--fold-bn", action="store_true", help="fold batch norm into conv/linear")
    g.add_argument("--lowrank", default=None, metavar="SPEC",
                   help="truncated SVD: ratio=F | energy=F | LAYER:r=N,... (e.g. 2:ratio=0.3)")
    g.add_argument("--lowrank-epochs", type=int, default=0, help="fine-tuning after the SVD")
    g.add_argument("--prune", default=None, metavar="SPEC",
                   help="target sparsity: 0.92 | fc1:0.95,fc2:0.9 | q=1.0 (|w| < q*std)")
    g.add_argument("--prune-units", default=None, metavar="SPEC",
                   help="structured: remove whole neurons/filters, e.g. fc1:0.3,conv2:10")
    g.add_argument("--prune-mode", default="oneshot", choices=("oneshot", "gradual", "global"))
    g.add_argument("--prune-steps", type=int, default=1,
                   help="gradual: pruning rounds on the cubic (AGP) schedule")
    g.add_argument("--retrain-epochs", type=int, default=0, help="training after pruning")
    g.add_argument("--retrain-lr", type=float, default=0.02)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--share-bits", default=None, metavar="SPEC",
                   help="k-means weight sharing: conv=8,fc=5 | fc1=4,fc=5 | 5")
    g.add_argument("--share-init", default="linear", choices=("linear", "random", "density"))
    g.add_argument("--share-biases", type=int, default=None, metavar="BITS",
                   help="share biases too (default: float16 biases)")
    g.add_argument("--finetune-epochs", type=int, default=0, help="centroid fine-tuning")
    g.add_argument("--finetune-lr", type=float, default=1e-4)
    g.add_argument("--quantize", default=None, metavar="KIND",
                   help="linear quantization instead of sharing: int8 | int2..int7 | ternary")
    g.add_argument("--per-channel", action="store_true", help="quantize: a scale per channel")
    g.add_argument("--asymmetric", action="store_true", help="quantize: min/max zero point")
    g.add_argument("--full-precision", action="store_true",
                   help="keep biases and shared values float32 (default: rounded to float16)")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--augment", default="shift", help="none | shift (for retraining)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("sensitivity scan")
    g.add_argument("--sensitivity", action="store_true",
                   help="scan accuracy vs sparsity per layer and propose --prune; no output file")
    g.add_argument("--levels", default="0.5,0.7,0.8,0.85,0.9,0.93,0.95,0.97,0.98",
                   help="sparsities the scan tries")
    g.add_argument("--tolerance", type=float, default=0.3,
                   help="accuracy drop (points) allowed per layer in the proposal")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="compressed model (.dcz)")
    g.add_argument("--report", default=None, help="report (.json)")
    g.add_argument("--figure", default=None,
                   help="weight histogram with centroids of the largest shared layer (.png)")
    g.add_argument("--no-progress", action="store_true")


def _load(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any], dict[str, Any]]:
    from distnet import backend
    from distnet.checkpoint import load_checkpoint
    from distnet.data import load_data

    ckpt = load_checkpoint(args.checkpoint)
    meta = dict(ckpt.meta or {})
    config = meta.get("config") or {}
    data = args.data or config.get("data") or (meta.get("data") or {}).get("source")
    if not data:
        raise ValueError(f"{args.checkpoint} does not record its data: give --data")
    val_size = args.val_size if args.val_size is not None else config.get("val_size")
    seed = int(config.get("seed") or 0)
    train, val, info = load_data(data, val_size=val_size, seed=seed)
    model = ckpt.model.to(backend.check_device(args.device or backend.default_device()))
    keep = {"model": meta.get("model"), "data": info,
            "config": {"data": data, "val_size": val_size, "seed": seed}}
    return model, train, val, info, keep


def _sensitivity(args: argparse.Namespace, model: Any, val: Any) -> int:
    from compression.sensitivity import format_scan, propose_sparsities, sensitivity_scan
    from distnet.train import evaluate

    levels = [float(s) for s in args.levels.split(",") if s.strip()]
    scan = sensitivity_scan(model, lambda m: evaluate(m, val)["accuracy"], levels,
                            progress=not args.no_progress)
    print(format_scan(scan))
    proposal = propose_sparsities(scan, args.tolerance / 100.0)
    from compression.prune import layer_aliases

    short = {name: alias for alias, name in layer_aliases(model).items()
             if alias.startswith(("fc", "conv"))}  # fc1 reads better than 2.weight
    spec = ",".join(f"{short.get(name, name)}:{s:g}" for name, s in proposal.items())
    print(f"proposed (each layer alone within {args.tolerance} points): --prune {spec}")
    if args.report:
        from compression.report import save_report

        save_report({**scan, "proposal": proposal, "prune_spec": spec}, args.report)
    return 0


def run(args: argparse.Namespace) -> int:
    model, train, val, info, meta = _load(args)
    if args.sensitivity:
        return _sensitivity(args, model, val)
    if not any((args.prune, args.prune_units, args.share_bits, args.quantize, args.lowrank,
                args.fold_bn)):
        raise ValueError("nothing to do: give --prune, --prune-units, --share-bits, --quantize, "
                         "--lowrank or --fold-bn (or --sensitivity)")
    if args.quantize and args.share_bits:
        raise ValueError("--quantize and --share-bits are alternatives: give one")
    from pathlib import Path

    from compression.pipeline import CompressionPlan, compress
    from compression.report import format_report, save_report

    plan = CompressionPlan(
        fold_bn=args.fold_bn, lowrank=args.lowrank, lowrank_epochs=args.lowrank_epochs,
        prune_units=args.prune_units, prune=args.prune, prune_mode=args.prune_mode,
        prune_steps=args.prune_steps,
        retrain_epochs=args.retrain_epochs, retrain_lr=args.retrain_lr,
        share_bits=args.share_bits, share_init=args.share_init, share_biases=args.share_biases,
        finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
        quantize=args.quantize, per_channel=args.per_channel, asymmetric=args.asymmetric,
        half_biases=not args.full_precision, half_codebooks=not args.full_precision,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size, augment=args.augment, seed=args.seed)
    result = compress(model, train, val, plan, info={"meta": meta},
                      progress=not args.no_progress,
                      log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_report(result.report))
    if args.out:
        Path(args.out).write_bytes(result.blob)
        print(f"compressed model: {args.out} ({len(result.blob):,} bytes)")
    if args.report:
        save_report(result.report, args.report)
        print(f"report: {args.report}")
    if args.figure:
        _figure(result, args.figure)
    return 0


def _figure(result: Any, path: str) -> None:
    from compression.report import plot_weights

    if not result.shared:
        print("figure: no shared layer to plot", file=sys.stderr)
        return
    from distnet import backend

    name, sp = max(result.shared.items(), key=lambda kv: kv[1].param.size)
    values = result.pre_share[name]  # before k-means: the distribution the centroids fit
    if plot_weights(values, backend.to_host(sp.centroids.data), path,
                    f"{name}: {values.size:,} kept weights, {sp.centroids.size} shared values"):
        print(f"figure: {path}")
    else:
        print("figure: matplotlib is not installed (pip install distnet[plot])", file=sys.stderr)
