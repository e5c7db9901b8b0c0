"""The main job: the whole journey on the default data, in one run directory.

A parameter server and MPI workers train in sync mode, then async; the sync model
is pruned, weight-shared and Huffman-coded (.dcz), then exported to ONNX with the
compression kept in the file and checked against distnet with onnxruntime. Each
stage has its own folder in runs/<name>/; the job ends with a summary table, the
plots (when matplotlib is installed) and the run directory's path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

EXAMPLES = """\
  distnet run                                   # digits, the whole journey
  distnet run --data mnist:../shared/data/mnist --epochs 10
  distnet run --stages local --epochs 3         # single-process training only
"""

STAGES = ("local", "sync", "async", "compress", "export")
DEFAULT_STAGES = ("sync", "async", "compress", "export")
# Deep Compression's recipe at the default data's scale: ~90% of the weights pruned,
# 5-bit shared values for the fully connected layers, Huffman coding.
COMPRESS_RECIPE = ["--prune", "fc1:0.93,fc2:0.9,fc3:0.7", "--retrain-epochs", "8",
                   "--share-bits", "fc=5", "--finetune-epochs", "2"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lenet300")
    p.add_argument("--data", default="digits")
    p.add_argument("--epochs", type=int, default=None, help="epochs per training stage")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--stages", default=",".join(DEFAULT_STAGES),
                   help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--name", default=None, help="run name (default: run-<time>)")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def _train_config(args: argparse.Namespace, run_dir: Path, mode: str) -> dict[str, Any]:
    from distnet.cli.train import add_arguments as train_arguments
    from distnet.cli.train import resolve

    parser = argparse.ArgumentParser()
    train_arguments(parser)
    argv = ["--model", args.model, "--data", args.data, "--mode", mode,
            "--seed", str(args.seed), "--workers", str(args.workers),
            "--run-dir", str(run_dir / mode), "--out", str(run_dir / mode / "model.npz")]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    if args.no_progress:
        argv.append("--no-progress")
    return resolve(parser.parse_args(argv))


def run_training(args: argparse.Namespace, run_dir: Path, mode: str) -> dict[str, Any]:
    from distnet.cli.train import train_local
    from distnet.rundir import create_run_dir

    config = _train_config(args, run_dir, mode)
    create_run_dir(config)
    t0 = time.perf_counter()
    if mode == "local":
        result = train_local(config)
    else:
        from distnet.dist.job import run_job

        result = run_job(config)
    result["wall_s"] = time.perf_counter() - t0
    result["checkpoint"] = config["out"]
    from distnet.checkpoint import load_checkpoint

    result["dense_bytes"] = 4 * load_checkpoint(config["out"]).model.num_parameters()
    return result


def run_compress(args: argparse.Namespace, run_dir: Path, checkpoint: str) -> dict[str, Any]:
    from distnet.cli.main import main

    out = run_dir / "compress"
    out.mkdir(parents=True, exist_ok=True)
    argv = ["compress", "--checkpoint", checkpoint, *COMPRESS_RECIPE, "--seed", str(args.seed),
            "--out", str(out / "model.dcz"), "--report", str(out / "report.json")]
    if args.no_progress:
        argv.append("--no-progress")
    if main(argv) != 0:
        raise RuntimeError("the compression stage failed (see the error above)")
    report = json.loads((out / "report.json").read_text())
    return {"dcz": str(out / "model.dcz"), "bytes": report["file_bytes"],
            "dense_bytes": report["dense_bytes"], "ratio": report["ratio"],
            "val_accuracy": report["accuracy"]["final"],
            "baseline_accuracy": report["accuracy"]["baseline"],
            "weights_kept_pct": report["weights_kept_pct"]}


def run_export(run_dir: Path, dcz: str) -> dict[str, Any]:
    """Export the compressed model and, for comparison, its dense float32 form; both are
    verified against distnet with onnxruntime on the validation inputs."""
    from compression.onnx_export import DEFAULT_OPSET, export_onnx
    from distnet.cli.export import input_shape_of, load_for_export, verify_batch

    out = run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind, dense in (("compressed", False), ("dense", True)):
        model, meta, encodings = load_for_export(dcz, dense, DEFAULT_OPSET)
        shape = input_shape_of(meta, None)
        x, described = verify_batch(meta, None, shape, 256)
        results[kind] = export_onnx(model, out / f"model-{kind}.onnx", input_shape=shape,
                                    weight_encodings=encodings, verify_inputs=x)
    small, big = results["compressed"], results["dense"]
    print(f"exported {out / 'model-compressed.onnx'}: {small.size_bytes:,} bytes, "
          f"{big.size_bytes / small.size_bytes:.2f}x smaller than the dense export; "
          f"verified: onnxruntime matches distnet (max abs diff {small.max_abs_diff:.3g} "
          f"on {described})")
    return {"onnx": str(out / "model-compressed.onnx"), "bytes": small.size_bytes,
            "dense_onnx_bytes": big.size_bytes, "ratio": big.size_bytes / small.size_bytes,
            "max_abs_diff": small.max_abs_diff}


def run(args: argparse.Namespace) -> int:
    from distnet.rundir import default_name, runs_root

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: expected some of {', '.join(STAGES)}")
    run_dir = Path(args.run_dir or runs_root() / (args.name or default_name("run", args.model)))
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"model": args.model, "data": args.data, "stages": {}}
    trained = None
    for mode in ("local", "sync", "async"):
        if mode in stages:
            print(f"== {mode} training ==", flush=True)
            summary["stages"][mode] = run_training(args, run_dir, mode)
            trained = trained or summary["stages"][mode]["checkpoint"]
    if "compress" in stages:
        if trained is None:
            raise ValueError("the compress stage needs a training stage before it")
        print("== compression ==", flush=True)
        summary["stages"]["compress"] = run_compress(args, run_dir, trained)
    if "export" in stages:
        if "compress" not in summary["stages"]:
            raise ValueError("the export stage needs the compress stage")
        print("== ONNX export ==", flush=True)
        summary["stages"]["export"] = run_export(run_dir, summary["stages"]["compress"]["dcz"])
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary)
    plot(run_dir)
    print(f"run directory: {run_dir}")
    return 0


def plot(run_dir: Path) -> None:
    try:
        from distnet.plots import plot_run

        written = plot_run(run_dir)
        print(f"plots: {len(written)} PNG files in {run_dir}")
    except ImportError:
        print("plots: skipped (pip install 'distnet[plot]' for matplotlib)")


def print_summary(summary: dict[str, Any]) -> None:
    """One line per stage: accuracy, throughput, size and ratio."""
    nan = float("nan")
    print(f"\n{'stage':10} {'val acc':>8} {'samples/s':>10} {'bytes':>11} {'ratio':>7}  note")
    dense = None
    for name, r in summary["stages"].items():
        acc = r.get("val_accuracy")
        acc_s = f"{100 * acc:7.2f}%" if acc is not None else f"{'':>8}"
        rate = r.get("samples_per_s")
        rate_s = f"{rate:10.0f}" if rate is not None else f"{'':>10}"
        note = ""
        if name in ("local", "sync", "async"):
            dense = dense or r.get("dense_bytes")
            size, ratio = r.get("dense_bytes"), 1.0 if r.get("dense_bytes") else nan
            note = f"{r.get('wall_s', 0):.1f} s"
        elif name == "compress":
            size, ratio = r["bytes"], r["ratio"]
            note = (f"{r['weights_kept_pct']:.1f}% of weights kept; dense "
                    f"{100 * r['baseline_accuracy']:.2f}%")
        else:
            size, ratio = r["bytes"], r["ratio"]
            note = f"vs dense .onnx {r['dense_onnx_bytes']:,} B; parity {r['max_abs_diff']:.2g}"
        size_s = f"{size:11,}" if size else f"{'':>11}"
        print(f"{name:10} {acc_s} {rate_s} {size_s} {ratio:6.1f}x  {note}")
