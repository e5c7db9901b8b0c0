"""The main job: train on the default data, then summarise, in one run directory.

Stages, each recorded in runs/<name>/: training in one process (`local`), then,
unless --quick, with a parameter server and MPI workers (`sync`, `async`), then
compression and ONNX export of the trained model, checked with onnxruntime. Ends
with a summary table and the run directory's path.
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lenet300")
    p.add_argument("--data", default="digits")
    p.add_argument("--epochs", type=int, default=None, help="epochs per training stage")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--stages", default=",".join(STAGES),
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
    return result


def run(args: argparse.Namespace) -> int:
    from distnet.rundir import default_name, runs_root

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: expected some of {', '.join(STAGES)}")
    run_dir = Path(args.run_dir or runs_root() / (args.name or default_name("run", args.model)))
    run_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"model": args.model, "data": args.data, "stages": {}}
    for mode in ("local", "sync", "async"):
        if mode in stages:
            print(f"== {mode} training ==", flush=True)
            summary["stages"][mode] = run_training(args, run_dir, mode)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary)
    print(f"run directory: {run_dir}")
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n{'stage':10} {'val accuracy':>12} {'samples/s':>10} {'wall s':>8}")
    for name, r in summary["stages"].items():
        acc = r.get("val_accuracy")
        print(f"{name:10} {100 * acc if acc is not None else float('nan'):11.2f}% "
              f"{r.get('samples_per_s', float('nan')):10.0f} {r.get('wall_s', 0):8.1f}")
