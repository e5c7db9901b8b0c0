"""Issue 3, table 3: bytes on the wire per step and final accuracy for each gradient codec.

    .venv/bin/python benchmarks/bench_codecs.py [--epochs 5] [--seeds 0,1,2]
        [--codecs none,fp16,int8,topk:1,topk:10]

lenet300, sync, 2 workers, global batch 128, MNIST 7,000/1,000, the recipe's optimizer
and schedule, the same epochs and seeds for every codec. Bytes are the chief worker's
client counters (every frame sent and received, headers included) per step, as its
step records give them (the first record, which also counts the initial pull, is left
out). The codec only shrinks the push: the parameters come back dense.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_dist import (
    BATCH,
    command_line,
    data_spec,
    job_args,
    med,
    run_train,
    step_field,
    step_times,
)


def bench_codecs(a: argparse.Namespace, tmp: Path) -> None:
    """The table: one sync job per codec and seed, codecs alternating in order."""
    codecs = a.codecs.split(",")
    seeds = [int(s) for s in a.seeds.split(",")]
    rows: dict[str, dict[str, list[float]]] = {c: {} for c in codecs}
    for seed in seeds:
        for codec in (codecs if seed % 2 == 0 else codecs[::-1]):
            # every codec on the wire (the same-host shared memory would carry "none")
            run = run_train(job_args("sync", 2, a.epochs, "--codec", codec,
                                     "--no-shared-memory", seed=seed),
                            tmp / f"codec-{codec.replace(':', '')}-{seed}")
            row = rows[codec]
            for key in ("bytes_sent", "bytes_received", "push_pull_ms"):
                row.setdefault(key, []).append(med(step_field(run.chief, key, 1)))
            row.setdefault("step_ms", []).append(1e3 * med(step_times(run.chief)))
            row.setdefault("acc", []).append(run.result["val_accuracy"])
    dense = med(rows["none"]["bytes_sent"]) if "none" in rows else float("nan")
    print(f"\nlenet300, sync, 2 workers, global batch {BATCH}, {data_spec()}, {a.epochs} epochs, "
          f"seeds {a.seeds}; bytes per step per worker (chief's client counters)\n")
    total_dense = dense + med(rows["none"]["bytes_received"]) if "none" in rows else dense
    print(f"{'codec':<9}{'push B/step':>13}{'vs none':>9}{'pull B/step':>13}{'push+pull':>11}"
          f"{'step ms':>9}{'val acc % (per seed)':>30}")
    for codec in codecs:
        row = rows[codec]
        sent, received = med(row["bytes_sent"]), med(row["bytes_received"])
        acc = f"{100 * med(row['acc']):.2f} (" + " ".join(f"{100 * x:.1f}" for x in row["acc"])
        print(f"{codec:<9}{sent:13,.0f}{sent / dense:9.3f}{received:13,.0f}"
              f"{(sent + received) / total_dense:11.3f}{med(row['step_ms']):9.2f}"
              f"{acc + ')':>30}")
    print("push+pull: both directions, relative to none (the pull is always dense float32)")
    print(f"\ncommand: {command_line(job_args('sync', 2, a.epochs, '--codec', 'CODEC'))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--codecs", default="none,fp16,int8,topk:1,topk:10")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        bench_codecs(a, Path(tmp))


if __name__ == "__main__":
    main()
