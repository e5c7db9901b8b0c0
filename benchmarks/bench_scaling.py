"""Issue 3, table 2: samples/s of lenet300 jobs with 1, 2 and 4 workers in every mode.

    .venv/bin/python benchmarks/bench_scaling.py [--rounds 3] [--epochs 3] [--workers 1,2,4]

Each job is ``distnet train --mode M --workers N`` (global batch 128, MNIST 7,000/1,000);
its throughput is the sum over workers of each one's median epoch rate (epochs >= 2; a
worker's rate counts its slice of every global batch). A local single-process run of
the same recipe is the reference, measured in the same rounds. Sync, async and SSP jobs
have one more process, the server; 4 workers are 4-5 processes on this 2-core machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_dist import (
    BATCH,
    MODES,
    command_line,
    data_spec,
    epochs_of,
    job_args,
    job_samples_per_s,
    med,
    run_train,
)

# at the recipe's lr, 4 async workers (4 momentum updates per global step, staleness ~3)
# diverge; scaling each update's lr by 1 / (1 + its staleness) keeps every job finite
ASYNC_EXTRA = ["--staleness-lr"]


def bench_scaling(a: argparse.Namespace, tmp: Path) -> None:
    """The table: every mode and worker count, plus the local reference, per round."""
    workers = [int(w) for w in a.workers.split(",")]
    rates: dict[tuple[str, int], list[float]] = {}
    accs: dict[tuple[str, int], list[float]] = {}
    jobs = [("local", 1)] + [(m, w) for w in workers for m in MODES]
    for r in range(a.rounds):
        for mode, w in (jobs if r % 2 == 0 else jobs[::-1]):
            extra = ASYNC_EXTRA if mode == "async" else []
            run = run_train(job_args(mode, w, a.epochs, *extra, seed=r),
                            tmp / f"sc-{mode}-{w}-{r}")
            if mode == "local":
                run.result = epochs_of(run.chief)[-1]
            rates.setdefault((mode, w), []).append(job_samples_per_s(run))
            accs.setdefault((mode, w), []).append(run.result["val_accuracy"])
    local = med(rates[("local", 1)])
    print(f"\nlenet300, global batch {BATCH}, {data_spec()}, {a.epochs} epochs, median of "
          f"{a.rounds} rounds; samples/s of the whole job (epochs >= 2)")
    print(f"reference: local (1 process, no communication) {local:.0f} samples/s\n")
    print(f"{'workers':<9}" + "".join(f"{m:>18}" for m in MODES))
    for w in workers:
        cells = [f"{med(rates[(m, w)]):8.0f} ({med(rates[(m, w)]) / local:4.2f}x)" for m in MODES]
        print(f"{w:<9}" + "".join(f"{c:>18}" for c in cells))
    print("\nfinal val accuracy (median)")
    for w in workers:
        print(f"{w:<9}" + "".join(f"{100 * med(accs[(m, w)]):17.1f}%" for m in MODES))
    print(f"\ncommand: {command_line(job_args('MODE', 0, a.epochs))}"
          .replace("--workers 0", "--workers N") + f"  (async: {' '.join(ASYNC_EXTRA)}; the "
          "reference: --mode local)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", default="1,2,4")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        bench_scaling(a, Path(tmp))


if __name__ == "__main__":
    main()
