"""Distributed training benchmarks (issue 3): the shared harness, and all of them in a row.

    .venv/bin/python benchmarks/bench_dist.py        # runs the four below with their defaults
    .venv/bin/python benchmarks/bench_sync_vs_allreduce.py  # 1. a sync (PS) step vs allreduce
    .venv/bin/python benchmarks/bench_scaling.py            # 2. samples/s, 1-4 workers, 4 modes
    .venv/bin/python benchmarks/bench_codecs.py             # 3. bytes/step and accuracy per codec
    .venv/bin/python benchmarks/bench_netns_topk.py         # 4. time to 97% over 1 Gbit/s (root)

Every job is a real ``python -m distnet.cli.main train --mode M ...`` (it starts mpiexec, one
process per rank; the namespace benchmark starts ``distnet serve`` and two standalone
workers) on lenet300 and the MNIST 7,000/1,000 split of ../shared/data/mnist (the built-in
digits when it is absent), global batch 128, no augmentation, one BLAS thread per process.

Timings come from the metrics the workers write: ``fit`` writes a step record (with a
wall-clock time) every 10 steps, so the time between two records of one epoch divided by
the steps between them is a per-step time without start-up, validation or shut-down;
epoch 1 (warm-up) is left out. Variants alternate within each round, so the machine's
drifting load hits all of them; tables quote medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MNIST = Path(os.environ.get("DISTNET_MNIST", ROOT.parent / "shared" / "data" / "mnist"))
BATCH = 128
MODES = ("sync", "async", "ssp", "allreduce")
SCRIPTS = ("bench_sync_vs_allreduce.py", "bench_scaling.py", "bench_codecs.py",
           "bench_netns_topk.py")


def data_spec() -> str:
    """The MNIST pair beside the checkout (7,000 train / 1,000 val), else the digits."""
    return f"mnist:{MNIST}" if (MNIST / "mnist8k-images-idx3-ubyte.gz").exists() else "digits"


def job_args(mode: str, workers: int, epochs: int, *extra: str, seed: int = 0) -> list[str]:
    """`distnet train` options of one benchmark job (the recipe's optimizer and schedule)."""
    return ["--mode", mode, "--workers", str(workers), "--data", data_spec(), "--epochs",
            str(epochs), "--batch-size", str(BATCH), "--augment", "none", "--seed", str(seed),
            "--no-progress", *extra]


@dataclass
class Run:
    """A finished job: the chief's result, each worker's metrics records, wall seconds."""

    result: dict[str, Any]
    workers: list[list[dict[str, Any]]]
    server: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0  # user + system CPU of every process of the job (mpiexec, ranks)
    launched: float = 0.0  # time.time() when the workers were started

    @property
    def chief(self) -> list[dict[str, Any]]:
        return self.workers[0]


def load_run(run_dir: Path, wall_s: float = 0.0, cpu_s: float = 0.0) -> Run:
    """Read ``result.json`` and the per-rank ``metrics*.jsonl`` files of a run directory."""
    result_file = run_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    workers: dict[int, list[dict[str, Any]]] = {}
    server: list[dict[str, Any]] = []
    for f in sorted(run_dir.glob("metrics*.jsonl")):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows and rows[0].get("role") == "server":
            server += rows
        elif rows:
            workers[int(rows[0].get("worker", 0))] = rows
    return Run(result, [workers[k] for k in sorted(workers)], server, wall_s, cpu_s)


def job_env() -> dict[str, str]:
    """The environment of every job: one BLAS thread per process unless the caller chose.

    mpiexec gives each rank cores/ranks threads (1 here once there are 2 ranks); a local or
    1-rank job would take 2, and OpenBLAS's spinning threads on a shared, loaded 2-core
    machine made a local epoch 4-20x slower (0.6-3.2 s against 0.15 s measured).
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, "1")
    return env


def run_train(args: list[str], run_dir: Path, timeout: float = 900,
              env: dict[str, str] | None = None) -> Run:
    """``distnet train ARGS`` in its own process group (killed afterwards in any case);
    ``env``: variables to set on top of ``job_env()``."""
    cmd = [PY, "-m", "distnet.cli.main", "train", *args, "--run-dir", str(run_dir),
           "--metrics", str(run_dir / "metrics.jsonl")]
    t0, cpu0 = time.perf_counter(), children_cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**job_env(), **(env or {})}, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        kill(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{err[-2000:]}")
    return load_run(run_dir, time.perf_counter() - t0, children_cpu() - cpu0)


def children_cpu() -> float:
    """CPU seconds of the reaped descendants (each parent of the job waits for its children,
    so after a job this counts mpiexec, its proxies and every rank)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def kill(proc: subprocess.Popen) -> None:
    """End ``proc``'s process group (the job's mpiexec and ranks)."""
    from distnet.dist.launcher import kill_group

    kill_group(proc)


def step_times(records: list[dict[str, Any]], first_epoch: int = 2) -> list[float]:
    """Seconds per step between consecutive step records of the same epoch (>= first_epoch)."""
    steps = [r for r in records if r["kind"] == "step" and r["epoch"] >= first_epoch]
    return [(b["time"] - a["time"]) / (b["step"] - a["step"])
            for a, b in zip(steps, steps[1:], strict=False) if a["epoch"] == b["epoch"]]


def step_field(records: list[dict[str, Any]], key: str, first_epoch: int = 2) -> list[float]:
    """A per-step mean the update recorded (``push_pull_ms``, ``bytes_sent``...), per record,
    leaving out the first record (it also counts the job's initial pull)."""
    rows = [r for r in records if r["kind"] == "step" and key in r][1:]
    return [float(r[key]) for r in rows if r["epoch"] >= first_epoch]


def epochs_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-epoch summary records (``seconds``, ``samples_per_s``, the chief's val)."""
    return [r for r in records if r["kind"] == "epoch"]


def job_samples_per_s(run: Run, first_epoch: int = 2) -> float:
    """Examples per second of the whole job: the sum over workers of each one's median
    epoch rate (its slice of every global batch), epochs >= first_epoch."""
    total = 0.0
    for records in run.workers:
        rates = [r["samples_per_s"] for r in epochs_of(records) if r["epoch"] >= first_epoch]
        total += statistics.median(rates or [r["samples_per_s"] for r in epochs_of(records)])
    return total


def med(xs: list[float]) -> float:
    """The median, nan for no values."""
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank), nan for no values."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def command_line(args: list[str]) -> str:
    """The command a table row ran (run dir and metrics options left out)."""
    return ".venv/bin/python -m distnet.cli.main train " + " ".join(args)


def main() -> None:
    """Run every benchmark of the suite with its defaults, one after the other."""
    for script in SCRIPTS:
        print(f"\n$ .venv/bin/python benchmarks/{script}", flush=True)
        subprocess.run([PY, str(Path(__file__).with_name(script))], check=False)


if __name__ == "__main__":
    main()
