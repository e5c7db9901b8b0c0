"""Compression speed and results: k-means, Huffman, .dcz, and the whole pipeline on MNIST.

    python benchmarks/bench_compression.py                      # the kernels only
    python benchmarks/bench_compression.py --checkpoint lenet300.npz \\
        --data mnist:../shared/data/mnist --preset lenet300      # + the Deep Compression run

Kernels: 1-D k-means of LeNet-300-100's 235,200 fc1 weights (+ the 266k of the whole
net) into 32 clusters, Huffman encode/decode of 300k cluster indices, and .dcz save
and load of a pruned and shared LeNet-300-100: medians of a few runs. The pipeline
part runs a preset (the settings we tuned per model) and prints the report: ratio =
dense float32 parameter bytes / .dcz file bytes, accuracy before and after.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_step import median_time  # the benchmarks folder is on sys.path when run

from compression import dcz, huffman
from compression.prune import prune_model
from compression.quantize import kmeans_1d, share_weights
from distnet.models import build_model

PRESETS = {
    "lenet300": {"prune": "fc1:0.92,fc2:0.9,fc3:0.75", "prune_mode": "gradual",
                 "prune_steps": 8, "retrain_epochs": 100, "retrain_lr": 0.05,
                 "weight_decay": 1e-4, "share_bits": "fc=5,fc1=4", "finetune_epochs": 5,
                 "finetune_lr": 1e-4},
    "lenet5": {"prune": "conv1:0.34,conv2:0.88,fc1:0.93,fc2:0.81", "prune_mode": "gradual",
               "prune_steps": 8, "retrain_epochs": 30, "retrain_lr": 0.03,
               "weight_decay": 5e-4, "share_bits": "conv=8,fc=5,fc1=4", "finetune_epochs": 3,
               "finetune_lr": 1e-4},
}


def kernels(reps: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(0)
    model = build_model("lenet300", (1, 28, 28), 10, seed=0)
    fc1 = model[2].weight.data.ravel()
    every = np.concatenate([p.data.ravel() for p in model.parameters()])
    rows = [
        {"what": "k-means 235,200 weights, k=32", "seconds": median_time(
            lambda: kmeans_1d(fc1, 32), reps)},
        {"what": f"k-means {every.size:,} weights, k=32", "seconds": median_time(
            lambda: kmeans_1d(every, 32), reps)},
    ]
    symbols = np.minimum(rng.geometric(0.2, 300_000), 32) - 1
    enc = huffman.encode(symbols, 32)
    rows.append({"what": "Huffman encode 300k indices", "seconds": median_time(
        lambda: huffman.encode(symbols, 32), reps),
        "bits_per_symbol": enc.nbits / symbols.size})
    rows.append({"what": "Huffman decode 300k indices", "seconds": median_time(
        lambda: huffman.decode(enc.data, enc.count, enc.lengths, enc.nbits), reps)})
    prune_model(model, {"fc1": 0.92, "fc2": 0.9, "fc3": 0.75})
    share_weights(model, {"2.weight": 5, "4.weight": 5, "6.weight": 5})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.dcz"
        rows.append({"what": ".dcz save (pruned, shared LeNet-300-100)", "seconds": median_time(
            lambda: dcz.save_dcz(path, model), reps), "bytes": path.stat().st_size})
        rows.append({"what": ".dcz load", "seconds": median_time(
            lambda: dcz.load_dcz(path), reps)})
    return rows


def pipeline(checkpoint: str, data: str, preset: str, progress: bool) -> dict[str, object]:
    from compression.pipeline import CompressionPlan, compress
    from compression.report import format_report
    from distnet.checkpoint import load_checkpoint
    from distnet.data import load_data

    ckpt = load_checkpoint(checkpoint)
    train, val, info = load_data(data)
    t0 = time.perf_counter()
    result = compress(ckpt.model, train, val, CompressionPlan(**PRESETS[preset]),
                      info={"meta": {"model": preset, "data": info}}, progress=progress)
    print(format_report(result.report))
    print(f"pipeline: {time.perf_counter() - t0:.0f} s")
    return result.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--checkpoint", default=None, help="trained model to compress")
    parser.add_argument("--data", default="mnist:../shared/data/mnist")
    parser.add_argument("--preset", default="lenet300", choices=sorted(PRESETS))
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    rows = kernels(args.reps)
    for row in rows:
        extra = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v:,}"
                          for k, v in row.items() if k not in ("what", "seconds"))
        print(f"{row['what']:<44} {1000 * row['seconds']:9.1f} ms  {extra}")
    results: dict[str, object] = {"kernels": rows}
    if args.checkpoint:
        results["pipeline"] = pipeline(args.checkpoint, args.data, args.preset,
                                       not args.no_progress)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
