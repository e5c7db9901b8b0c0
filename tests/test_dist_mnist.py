"""lenet300 on the MNIST 7,000/1,000 split, 2 workers: async and SSP learn as well as sync.

Every mode gets the SAME budget: 8 epochs, global batch 128, no augmentation, plain
SGD at lr 0.2 on a cosine schedule (the recipe's 100-step warm-up), real ``distnet
train --mode M --workers 2`` jobs (mpiexec, 1 server + 2 workers). Async pushes and
pulls every step; SSP uses bound 2. Async and SSP make two updates per global step,
each at half the rate (``server_role.UpdateSchedule``).

Why plain SGD, not the recipe's momentum 0.9: async gradients are stale, and heavy
momentum with delayed gradients oscillates (at the recipe's lr, 3 epochs, async
reached 83-89% against sync's 94-95%). Plain SGD tolerates the delay.

Measured gaps, sync minus mode, in points of val accuracy (positive: the mode is
worse), one run per seed, 1,000 validation images (1 image = 0.1 point):

    seed                          0    1    2    3    4    5    6    7    mean
    async --no-pull-overlap     -0.1  0.2  0.1  0.3  0.2 -0.1  0.3  0.0   0.11
    async (pull overlaps)        0.1 -0.2  0.6  0.5  0.5  0.3  0.3  0.3   0.30
    SSP (seeds 0-2, 9 runs)      max 0.1

With the pull overlapping the next step a gradient is one update staler and async
trails by 0.3 on average, with single runs up to 0.9 (earlier sessions, 12 runs):
too close to 0.5 for a test of one run. Waiting for the pull (``--no-pull-overlap``)
takes the mean gap to 0.1; the mean over three seeds is held to 0.5 points. The
overlapping default is held to 1.5 points on one seed: a real regression is far
outside it (at the recipe's momentum async trails by 5-11 points). SSP: 0.5 points,
one seed. Each job takes 4-8 s here; the module ~1 min.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from procs import run

pytestmark = [pytest.mark.mpi, pytest.mark.slow]

BUDGET = ["--model", "lenet300", "--workers", "2", "--val-size", "1000", "--epochs", "8",
          "--batch-size", "128", "--augment", "none", "--optimizer", "sgd",
          "--momentum", "0", "--lr", "0.2", "--schedule", "cosine", "--no-progress",
          "--timeout", "60"]
SEEDS = (0, 1, 2)
ASYNC = ["--push-every", "1", "--pull-every", "1"]
# mode -> (options, seeds, tolerance in accuracy): the mean over the seeds is compared
MODES = {"async": ([*ASYNC, "--no-pull-overlap"], SEEDS, 0.005),
         "async-overlap": (ASYNC, (0,), 0.015),
         "ssp": (["--staleness", "2", "--pull-every", "1"], (0,), 0.005)}
JOB_TIMEOUT = 80.0  # seconds, per job


def train(mode: str, mnist: Path, run_dir: Path, *extra: str) -> dict[str, Any]:
    """``distnet train --mode MODE`` with the shared budget; the chief's result."""
    cmd = [sys.executable, "-m", "distnet.cli.main", "train", "--mode", mode,
           "--data", f"mnist:{mnist}", *BUDGET, *extra, "--run-dir", str(run_dir)]
    run(cmd, JOB_TIMEOUT, env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    return json.loads((run_dir / "result.json").read_text())


Runs = dict[int, dict[str, Any]]  # seed -> the job's result


def results(mode: str, mnist: Path, tmp: Any, seeds: tuple[int, ...], *extra: str) -> Runs:
    return {seed: train(mode, mnist, tmp.mktemp(f"{mode}{seed}"), "--seed", str(seed), *extra)
            for seed in seeds}


def accuracy(runs: Runs) -> float:
    return sum(r["val_accuracy"] for r in runs.values()) / len(runs)


@pytest.fixture(scope="module")
def sync_runs(mnist_dir: Path, mpiexec: str, tmp_path_factory) -> Runs:
    return results("sync", mnist_dir, tmp_path_factory, SEEDS)


def test_sync_reaches_the_budget_accuracy(sync_runs: Runs) -> None:
    for r in sync_runs.values():
        assert r["mode"] == "sync" and r["workers"] == 2
        assert r["val_accuracy"] >= 0.94  # measured 0.949-0.956 over seeds 0-7


def check_gap(mode: str, runs: Runs, sync: Runs, tolerance: float) -> None:
    gap = accuracy(sync) - accuracy(runs)
    assert gap <= tolerance + 1e-9, (
        f"{mode} reached {100 * accuracy(runs):.2f}% (mean of {len(runs)} seeds), sync "
        f"{100 * accuracy(sync):.2f}%: {100 * gap:.2f} points behind "
        f"(tolerance {100 * tolerance:.1f})")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_matches_sync_accuracy(mode: str, sync_runs: Runs, mnist_dir: Path,
                                    mpiexec: str, tmp_path_factory) -> None:
    extra, seeds, tolerance = MODES[mode]
    runs = results(mode.split("-")[0], mnist_dir, tmp_path_factory, seeds, *extra)
    for r in runs.values():
        assert r["workers"] == 2
        stats = r["server_stats"][0]
        if mode.startswith("async"):  # it really ran asynchronously: pushes met newer versions
            assert any(int(s) > 0 and n for s, n in stats["staleness_hist"].items()), stats
        else:
            assert r["max_staleness"] <= 2 + 1  # bound 2 (+1: the clock being reported)
    check_gap(mode, runs, {seed: sync_runs[seed] for seed in seeds}, tolerance)
