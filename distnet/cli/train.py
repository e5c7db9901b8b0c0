"""Train a model: in one process, or distributed (parameter server or allreduce).

Without --mode the model trains in this process. With --mode sync|async|ssp|allreduce
it trains on --workers MPI ranks (started with mpiexec for you, or already under
mpiexec), each on its own shard of the data. Options left out take the model's tuned
recipe (see --print-config).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from distnet.cli.options import add_reliability_options

EXAMPLES = """\
  distnet train                                   # lenet300 on the built-in digits
  distnet train --model lenet300 --data mnist:../shared/data/mnist --out lenet300.npz
  distnet train --model lenet5 --data mnist:DIR --epochs 20 --lr 0.03 --optimizer momentum
  distnet train --mode sync --workers 2 --data mnist:DIR --out sync.npz
  distnet train --mode ssp --staleness 2 --workers 4 --servers 2
  distnet train --config cluster/jobs/local-sync.toml --print-config
"""

MODES = ("local", "sync", "async", "ssp", "allreduce")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="lenet300", help="zoo model (default: lenet300)")
    g.add_argument("--data", default="digits",
                   help="digits (default) | mnist:DIR | synthetic[:N]")
    g.add_argument("--val-size", type=int, default=None,
                   help="examples held out for validation (mnist pair: 1000)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: $DISTNET_DEVICE or cpu)")
    g = p.add_argument_group("recipe (defaults: the model's recipe)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="global batch size")
    g.add_argument("--lr", type=float, default=None, help="base learning rate")
    g.add_argument("--optimizer", default=None,
                   help="sgd | momentum | nesterov | adagrad | rmsprop | adam")
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--schedule", default=None, help="constant | step | cosine")
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--clip-norm", type=float, default=None, help="global gradient-norm clip")
    g.add_argument("--augment", default=None, help="none | shift (random 2-pixel shifts)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="checkpoint to write (.npz)")
    g.add_argument("--metrics", default=None, help="JSON-lines metrics file")
    g.add_argument("--run-dir", default=None, help="run directory (default: runs/<name>)")
    g.add_argument("--name", default=None, help="run name (default: model-mode-time)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as TOML and exit")
    g = p.add_argument_group("distributed")
    g.add_argument("--mode", default="local", choices=MODES)
    g.add_argument("--workers", type=int, default=2, help="worker processes")
    g.add_argument("--servers", type=int, default=1, help="parameter-server shards")
    g.add_argument("--shards-per-server", default=None, metavar="N|auto",
                   help="parameter shards each server process serves from one loop (default "
                        "1; auto: one per ~2 MB): each shard's update overlaps the others' "
                        "transfer")
    g.add_argument("--colocate", action=argparse.BooleanOptionalAction, default=False,
                   help="run server shard k as a thread of worker rank k (no extra ranks; "
                        "that worker reaches its shard over inproc://)")
    g.add_argument("--server", default=None,
                   help="address(es) of running servers (distnet serve), comma-separated")
    g.add_argument("--push-every", type=int, default=1, help="async: push every N steps")
    g.add_argument("--pull-every", type=int, default=1, help="async: pull every N steps")
    g.add_argument("--pull-overlap", action=argparse.BooleanOptionalAction, default=True,
                   help="async: let a pull overlap the next step (faster; gradients one "
                        "update staler); --no-pull-overlap waits for it at once")
    g.add_argument("--staleness", type=int, default=2, help="ssp: staleness bound s")
    g.add_argument("--staleness-lr", action="store_true",
                   help="async: scale the learning rate by 1/(1+staleness)")
    g.add_argument("--codec", default="none", help="none | fp16 | int8 | topk[:PERCENT]")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds any wait on a peer may take before it is an error")
    g.add_argument("--hostfile", default=None, help="mpirun hostfile (host slots=N)")
    add_reliability_options(p)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of this run: command-line/TOML values over the model's recipe."""
    from distnet.models import recipe

    config = recipe(args.model)
    config.setdefault("momentum", 0.9)
    config.setdefault("clip_norm", None)
    for key, value in vars(args).items():
        if key.startswith("_") or key in ("config", "debug", "print_config", "command"):
            continue
        if value is not None or key not in config:
            config[key] = value
    if config["mode"] not in MODES:
        raise ValueError(f"unknown mode {config['mode']!r}: expected one of {', '.join(MODES)}")
    for key in ("epochs", "batch_size", "workers", "servers"):
        if config[key] is not None and int(config[key]) < (0 if key == "epochs" else 1):
            raise ValueError(f"--{key.replace('_', '-')} must be positive, got {config[key]}")
    return config


def run(args: argparse.Namespace) -> int:
    config = resolve(args)
    if args.print_config:
        from distnet.config import to_toml

        print(to_toml(config), end="")
        return 0
    if config["mode"] == "local":
        from distnet.rundir import create_run_dir

        create_run_dir(config, config["model"], config["mode"])
        result = train_local(config)
        result["run_dir"] = config["run_dir"]
    else:
        from distnet.dist.job import run_job

        # The job names one run directory for all its ranks; only the chief returns a result.
        result = run_job(config)
    if result is None:
        return 0
    if result.get("val_accuracy") is not None:
        print(f"accuracy: {100 * result['val_accuracy']:.2f}%  loss: {result['val_loss']:.4f}")
    if result.get("checkpoint"):
        print(f"checkpoint: {result['checkpoint']}")
    if result.get("run_dir"):
        print(f"run directory: {result['run_dir']}")
    return 0


def train_local(config: dict[str, Any]) -> dict[str, Any]:
    """Single-process training with the resolved ``config``; returns the final metrics."""
    from distnet import backend
    from distnet.checkpoint import save_checkpoint
    from distnet.data import load_data
    from distnet.metrics import MetricsWriter
    from distnet.nn import CrossEntropyLoss
    from distnet.setup import augmentation_for, build_training, normalize_inputs
    from distnet.train import LocalUpdate, fit

    device = backend.check_device(config["device"] or backend.default_device())
    train, val, info = load_data(config["data"], val_size=config["val_size"], seed=config["seed"])
    model, optimizer, schedule = build_training(config, info, len(train))
    normalize_inputs(model, train)
    model.to(device)
    with MetricsWriter(config["metrics"], rank=0, mode="local") as metrics:
        history = fit(model, train, val, epochs=config["epochs"],
                      batch_size=config["batch_size"], criterion=CrossEntropyLoss(),
                      update=LocalUpdate(optimizer, schedule), seed=config["seed"],
                      augment=augmentation_for(config, info), metrics=metrics,
                      progress=not config["no_progress"])
    result = dict(history[-1]) if history else {}
    if config["out"]:
        save_checkpoint(config["out"], model, optimizer, meta={
            "model": config["model"], "data": info, "mode": "local",
            "config": json.loads(json.dumps(config, default=str)), "result": result,
        })
        result["checkpoint"] = config["out"]
    return result
