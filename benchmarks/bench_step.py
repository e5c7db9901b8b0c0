"""One training step (forward, backward, SGD-momentum update; batch 128): distnet vs PyTorch.

    python benchmarks/bench_step.py [--reps 200] [--models lenet300,lenet5]

Prints a table of median step times, the ratio to PyTorch CPU measured in the same
run (when torch is installed), and the GFLOP/s achieved against this machine's own
NumPy float32 matmul rate. Each side is timed in its own child process (OpenBLAS's
and torch's thread pools slow each other down when they share one), in alternating
rounds, and the table quotes medians, because the machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from distnet.models import build_model
from distnet.nn import CrossEntropyLoss, skip_input_grad
from distnet.optim import build_optimizer
from distnet.train import train_step

BATCH = 128


def step_flops(name: str) -> float:
    """Multiply-adds x2 of forward + backward (grad W and grad x, none for the input layer)."""
    if name == "lenet300":
        fwd = 784 * 300 + 300 * 100 + 100 * 10
        return 2 * BATCH * fwd * 3 - 2 * BATCH * 784 * 300
    conv1 = 24 * 24 * 20 * 25
    conv2 = 8 * 8 * 50 * 20 * 25
    fc = 800 * 500 + 500 * 10
    return 2 * BATCH * (3 * (conv1 + conv2 + fc) - conv1)


def matmul_rate(reps: int = 10) -> float:
    """This machine's NumPy float32 GEMM rate (GFLOP/s) on 2048x2048."""
    a = np.random.default_rng(0).random((2048, 2048), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, a, out=out)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        np.matmul(a, a, out=out)
        times.append(time.perf_counter() - t)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def distnet_step(name: str) -> Callable[[], None]:
    model = build_model(name, (1, 28, 28), 10, seed=0)
    skip_input_grad(model)  # as training does: nothing needs d loss / d images
    opt = build_optimizer("momentum", model, lr=0.01, momentum=0.9)
    crit = CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = rng.random((BATCH, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, BATCH).astype(np.int64)

    def step() -> None:
        train_step(model, crit, x, y)
        opt.step()

    return step


def torch_step(name: str) -> Callable[[], None] | None:
    try:
        import torch
    except ImportError:
        return None
    tnn = torch.nn
    if name == "lenet300":
        model = tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 300), tnn.ReLU(),
                               tnn.Linear(300, 100), tnn.ReLU(), tnn.Linear(100, 10))
    else:
        model = tnn.Sequential(tnn.Conv2d(1, 20, 5), tnn.MaxPool2d(2), tnn.Conv2d(20, 50, 5),
                               tnn.MaxPool2d(2), tnn.Flatten(), tnn.Linear(800, 500),
                               tnn.ReLU(), tnn.Linear(500, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crit = tnn.CrossEntropyLoss()
    x = torch.rand(BATCH, 1, 28, 28)
    y = torch.randint(0, 10, (BATCH,))

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        crit(model(x), y).backward()
        opt.step()

    return step


def median_time(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def child(side: str, name: str, reps: int) -> None:
    """Time one side in this process and print the median seconds as JSON."""
    fn = distnet_step(name) if side == "distnet" else torch_step(name)
    if fn is None:
        print(json.dumps(None))
        return
    median_time(fn, 5)  # warm up caches, workspaces and thread pools
    print(json.dumps(median_time(fn, reps)))


def time_in_child(side: str, name: str, reps: int) -> float | None:
    out = subprocess.run([sys.executable, __file__, "--child", side, "--models", name,
                          "--reps", str(reps)], capture_output=True, text=True, timeout=600,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="lenet300,lenet5")
    ap.add_argument("--child", choices=("distnet", "torch"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.models, args.reps)
        return
    rate = matmul_rate()
    print(f"NumPy float32 matmul 2048x2048: {rate:.0f} GFLOP/s")
    print(f"{'model':10} {'distnet ms':>11} {'torch ms':>9} {'ratio':>6} "
          f"{'GFLOP/s':>8} {'% of matmul':>11}")
    for name in args.models.split(","):
        reps = args.reps if name == "lenet300" else max(args.reps // 8, 10)
        ours, theirs = [], []
        for _ in range(args.rounds):  # alternate so drifting load hits both alike
            ours.append(time_in_child("distnet", name, reps))
            t = time_in_child("torch", name, reps)
            if t is not None:
                theirs.append(t)
        t_ours = statistics.median(ours)
        t_torch = statistics.median(theirs) if theirs else float("nan")
        gflops = step_flops(name) / t_ours / 1e9
        print(f"{name:10} {t_ours * 1e3:11.3f} {t_torch * 1e3:9.3f} {t_ours / t_torch:6.2f} "
              f"{gflops:8.1f} {100 * gflops / rate:10.0f}%")


if __name__ == "__main__":
    main()
