"""LeNet-5's conv/pool stack (conv1, pool1, conv2, pool2), forward + backward, vs PyTorch.

Times each layer's forward and backward at batch 128 on 28x28 inputs, distnet and
torch interleaved in one process (medians over many repetitions; the machine is
shared, so compare the ratio, not the absolute numbers). conv1 computes no input
gradient on either side (``input_grad = False`` here, no ``requires_grad`` there).

    python benchmarks/conv_micro.py [--reps 60] [--block 10] [--batch 128] [--threads 2] [--full]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from distnet.nn.conv import Conv2d
from distnet.nn.pool import MaxPool2d

NAMES = ("conv1", "pool1", "conv2", "pool2")


def build(seed: int = 0) -> list:
    conv1, conv2 = Conv2d(1, 20, 5, seed=seed), Conv2d(20, 50, 5, seed=seed + 1)
    conv1.input_grad = False
    return [conv1, MaxPool2d(2), conv2, MaxPool2d(2)]


def run_distnet(layers: list, x: np.ndarray, g: np.ndarray, times: dict) -> None:
    y = x
    for name, layer in zip(NAMES, layers, strict=True):
        t = time.perf_counter()
        y = layer.forward(y)
        times[name + " fwd"].append(time.perf_counter() - t)
    grad = g
    for name, layer in zip(NAMES[::-1], layers[::-1], strict=True):
        t = time.perf_counter()
        grad = layer.backward(grad)
        times[name + " bwd"].append(time.perf_counter() - t)


def run_torch(torch, mods: list, x, g, times: dict) -> None:
    y, inputs, outputs = x, [], []
    for name, mod in zip(NAMES, mods, strict=True):
        t = time.perf_counter()
        y_in = y if name == "conv1" else y.detach().requires_grad_()
        out = mod(y_in)
        times[name + " fwd"].append(time.perf_counter() - t)
        inputs.append(y_in)
        outputs.append(out)
        y = out
    grad = g
    for i in reversed(range(len(NAMES))):
        t = time.perf_counter()
        outputs[i].backward(grad)
        grad = inputs[i].grad
        times[NAMES[i] + " bwd"].append(time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--block", type=int, default=10, help="steps per alternation")
    parser.add_argument("--full", action="store_true", help="also time the whole LeNet-5 step")
    args = parser.parse_args()
    import torch  # noqa: PLC0415 - only the benchmark needs it

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 1, 28, 28), dtype=np.float32)
    g = rng.standard_normal((args.batch, 50, 4, 4)).astype(np.float32)
    layers = build()
    mods = [torch.nn.Conv2d(1, 20, 5), torch.nn.MaxPool2d(2), torch.nn.Conv2d(20, 50, 5),
            torch.nn.MaxPool2d(2)]
    with torch.no_grad():
        for mod, layer in zip(mods, layers, strict=True):
            if isinstance(layer, Conv2d):
                mod.weight.copy_(torch.from_numpy(layer.weight.data))
                mod.bias.copy_(torch.from_numpy(layer.bias.data))
    tx, tg = torch.from_numpy(x), torch.from_numpy(g)
    keys = [f"{n} {p}" for n in NAMES for p in ("fwd", "bwd")]
    ours: dict = {k: [] for k in keys}
    theirs: dict = {k: [] for k in keys}
    for _ in range(5):
        run_distnet(layers, x, g, {k: [] for k in keys})
        run_torch(torch, mods, tx, tg, {k: [] for k in keys})
    # Alternate in blocks rather than per step: OpenBLAS's and torch's OpenMP worker
    # threads spin for a while after each call and would steal the other's 2 cores.
    for start in range(0, args.reps, args.block):
        for _ in range(min(args.block, args.reps - start)):
            run_distnet(layers, x, g, ours)
        for _ in range(min(args.block, args.reps - start)):
            run_torch(torch, mods, tx, tg, theirs)
    print(f"batch {args.batch}, {args.reps} reps, medians in ms; blocks (fwd, input-grad): "
          f"conv1 {layers[0]._block_cache}, conv2 {layers[2]._block_cache}")
    print(f"{'':12s} {'distnet':>9s} {'torch':>9s} {'ratio':>7s}")
    total_o = np.zeros(args.reps)
    total_t = np.zeros(args.reps)
    for k in keys:
        o, t = np.array(ours[k]) * 1e3, np.array(theirs[k]) * 1e3
        total_o += o
        total_t += t
        print(f"{k:12s} {np.median(o):9.2f} {np.median(t):9.2f} {np.median(o) / np.median(t):7.2f}")
    for n in NAMES:
        o = (np.array(ours[n + " fwd"]) + np.array(ours[n + " bwd"])) * 1e3
        t = (np.array(theirs[n + " fwd"]) + np.array(theirs[n + " bwd"])) * 1e3
        print(f"{n + ' f+b':12s} {np.median(o):9.2f} {np.median(t):9.2f} "
              f"{np.median(o) / np.median(t):7.2f}")
    print(f"{'total':12s} {np.median(total_o):9.2f} {np.median(total_t):9.2f} "
          f"{np.median(total_o) / np.median(total_t):7.2f}")
    if args.full:
        full_step(torch, args)


def full_step(torch, args: argparse.Namespace) -> None:
    """The whole LeNet-5 training step (SGD with momentum), distnet vs torch."""
    from distnet.nn.activation import ReLU  # noqa: PLC0415
    from distnet.nn.linear import Linear, skip_input_grad  # noqa: PLC0415
    from distnet.nn.loss import CrossEntropyLoss  # noqa: PLC0415
    from distnet.nn.module import Sequential  # noqa: PLC0415
    from distnet.nn.shape import Flatten, Normalize  # noqa: PLC0415
    from distnet.optim import build_optimizer  # noqa: PLC0415
    from distnet.train import train_step  # noqa: PLC0415

    rng = np.random.default_rng(0)
    x = rng.random((args.batch, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, args.batch)
    model = Sequential(Normalize(0.1307, 0.3081), *build(), Flatten(), Linear(800, 500, seed=2),
                       ReLU(), Linear(500, 10, seed=3))
    model[1].input_grad = True
    skip_input_grad(model)
    criterion = CrossEntropyLoss()
    opt = build_optimizer("momentum", model, lr=0.01)
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 20, 5), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(20, 50, 5), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(800, 500), torch.nn.ReLU(),
                              torch.nn.Linear(500, 10))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    ref_loss = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def ours() -> None:
        train_step(model, criterion, x, y)
        opt.step()

    def theirs() -> None:
        ref_opt.zero_grad()
        ref_loss(ref((tx - 0.1307) / 0.3081), ty).backward()
        ref_opt.step()

    times: dict = {"distnet": [], "torch": []}
    for _ in range(5):
        ours()
        theirs()
    for start in range(0, args.reps, args.block):
        for name, fn in (("distnet", ours), ("torch", theirs)):
            for _ in range(min(args.block, args.reps - start)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    o, t = np.median(times["distnet"]) * 1e3, np.median(times["torch"]) * 1e3
    print(f"LeNet-5 training step, batch {args.batch}: distnet {o:.2f} ms, torch {t:.2f} ms, "
          f"ratio {o / t:.2f}")


if __name__ == "__main__":
    main()
