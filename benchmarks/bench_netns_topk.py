"""Issue 3, table 4: time to 97% validation accuracy over 1 Gbit/s links, with and without top-k.

    sudo .venv/bin/python benchmarks/bench_netns_topk.py [--rounds 2] [--epochs 20]
        [--codecs none,topk:10,topk:1] [--topology bridge|pairwise] [--rate 1gbit]

``cluster/netns.sh up --rate 1gbit`` makes three network namespaces (server 10.77.0.1,
w1, w2) whose interfaces are token-bucket limited; ``distnet serve`` runs in the server
namespace with CURVE keys (a non-loopback bind requires them) and two standalone
``distnet train --server ADDR`` workers (DISTNET_RANK 0 and 1) in w1 and w2: lenet300,
sync, global batch 128, MNIST 7,000/1,000, validation after every epoch. The time to the
target is read from the chief's epoch records: the first epoch whose val accuracy is
>= 0.97. Needs root (skipped with a message otherwise); the namespaces are always
removed in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_dist import (
    PY,
    ROOT,
    Run,
    command_line,
    data_spec,
    epochs_of,
    job_args,
    job_env,
    kill,
    load_run,
    med,
    step_field,
    step_times,
)


def netns_problem() -> str | None:
    """Why the namespace benchmark cannot run here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root for network namespaces (cluster/netns.sh)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs the ip and tc commands (iproute2)"
    return None


def netns(*args: str, prefix: str) -> subprocess.CompletedProcess:
    """``cluster/netns.sh ARGS`` for the namespaces named ``<prefix>-*``."""
    return subprocess.run(["bash", str(ROOT / "cluster" / "netns.sh"), *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DN_PREFIX": prefix, "PYTHON": PY})


def run_in_namespaces(prefix: str, args: list[str], run_dir: Path, keys: Path,
                      timeout: float = 900) -> Run:
    """``distnet serve`` in <prefix>-server and two standalone workers in -w1 and -w2."""
    env = job_env()

    def start(host: str, argv: list[str], extra: dict[str, str] | None = None,
              ) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", f"{prefix}-{host}", PY, "-m",
                                 "distnet.cli.main", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**env, **(extra or {})}, start_new_session=True)

    serve_args = [x for x in args if x != "--no-progress"]
    for opt in ("--codec",):  # worker-only options
        if opt in serve_args:
            i = serve_args.index(opt)
            del serve_args[i:i + 2]
    procs = []
    t0, launched = time.perf_counter(), 0.0
    try:
        server = start("server", ["serve", "--bind", "tcp://10.77.0.1:0", "--keys", str(keys),
                                  *serve_args])
        procs.append(server)
        if not select.select([server.stdout], [], [], 120)[0]:
            raise RuntimeError("distnet serve printed nothing within 120 s")
        line = server.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"distnet serve: {line}{server.stderr.read()[-2000:]}")
        address = line.split()[4]
        launched = time.time()
        for rank, host in enumerate(("w1", "w2")):
            procs.append(start(host, ["train", *args, "--server", address, "--keys", str(keys),
                                      "--run-dir", str(run_dir), "--metrics",
                                      str(run_dir / "metrics.jsonl")],
                               {"DISTNET_RANK": str(rank)}))
        for p in procs[1:]:
            _, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"worker failed:\n{err[-2000:]}")
        server.wait(timeout=60)
    finally:
        for p in procs:
            kill(p)
    run = load_run(run_dir, time.perf_counter() - t0)
    run.launched = launched
    return run


def time_to(run: Run, target: float) -> tuple[float, float, int]:
    """(training seconds, seconds since the workers were launched, epoch) at which the
    chief's val accuracy first reaches ``target``; nan when it never does."""
    train_s = 0.0
    for r in epochs_of(run.chief):
        train_s += r["seconds"]
        if r.get("val_accuracy", 0.0) >= target:
            return train_s, r["time"] - run.launched, r["epoch"]
    return float("nan"), float("nan"), 0


def bench_netns(a: argparse.Namespace, tmp: Path) -> None:
    """The table: namespaces up, one job per codec and round, namespaces down (finally)."""
    problem = netns_problem()
    if problem:
        print(f"netns benchmark skipped: {problem}")
        return
    from distnet.cli.main import main as distnet

    keys = tmp / "keys"
    with contextlib.redirect_stdout(io.StringIO()):
        made = distnet(["keygen", "--dir", str(keys), "--clients", "2"])
    if made != 0:
        raise RuntimeError("distnet keygen failed")
    codecs = a.codecs.split(",")
    prefix = f"bd{os.getpid() % 10000}"
    out: dict[str, dict[str, list[float]]] = {c: {} for c in codecs}
    try:
        up = netns("up", "--rate", a.rate, "--topology", a.topology, prefix=prefix)
        if up.returncode != 0:
            raise RuntimeError(f"netns.sh up failed: {up.stderr}")
        for r in range(a.rounds):
            for codec in (codecs if r % 2 == 0 else codecs[::-1]):
                args = job_args("sync", 2, a.epochs, "--codec", codec, seed=r)
                run = run_in_namespaces(prefix, args, tmp / f"ns-{codec.replace(':', '')}-{r}",
                                        keys)
                train_s, since_s, epoch = time_to(run, a.target)
                row = out[codec]
                for key, v in (("train_s", train_s), ("since_s", since_s), ("epoch", epoch),
                               ("step_ms", 1e3 * med(step_times(run.chief))),
                               ("push_pull_ms", med(step_field(run.chief, "push_pull_ms"))),
                               ("acc", run.result["val_accuracy"]), ("wall_s", run.wall_s)):
                    row.setdefault(key, []).append(v)
    finally:
        down = netns("down", prefix=prefix)
        if down.returncode != 0:
            print(f"netns.sh down failed: {down.stderr}", file=sys.stderr)
    print(f"\nlenet300, sync, 2 workers + 1 server in 3 namespaces ({a.topology}, tbf {a.rate} "
          f"on every interface), {data_spec()}, {a.epochs} epochs, {a.rounds} rounds "
          f"(each round's epoch and time below its row)\n")
    print(f"{'codec':<9}{'reached':>8}{'epoch':>6}{'train s':>9}{'since launch s':>16}"
          f"{'step ms':>9}{'push_pull ms':>14}{'final acc %':>12}{'job wall s':>11}")
    for codec in codecs:
        row = out[codec]
        hit = [i for i, e in enumerate(row["epoch"]) if e > 0]

        def hit_med(key: str, row: dict[str, list[float]] = row, hit: list[int] = hit) -> float:
            return med([row[key][i] for i in hit])

        reached = f"{len(hit)}/{len(row['epoch'])}"
        print(f"{codec:<9}{reached:>8}{hit_med('epoch'):6.1f}"
              f"{hit_med('train_s'):9.2f}{hit_med('since_s'):16.2f}{med(row['step_ms']):9.2f}"
              f"{med(row['push_pull_ms']):14.2f}{100 * med(row['acc']):12.2f}"
              f"{med(row['wall_s']):11.1f}")
        print(f"{'':<9}  rounds: " + ", ".join(
            f"epoch {e:.0f}, {t:.1f} s" if e > 0 else f"not reached (final {100 * acc:.1f}%)"
            for e, t, acc in zip(row["epoch"], row["since_s"], row["acc"], strict=True)))
    print(f"\nreached: rounds whose val accuracy reached {a.target:.0%} (epoch and times: "
          f"medians over those); train s: sum of the chief's epoch times up to the first "
          f"epoch whose val accuracy >= {a.target:.0%}; since launch: from starting the worker "
          f"processes to that epoch's record (start-up, CURVE handshakes, validations)")
    print(f"commands: cluster/netns.sh up --rate {a.rate} --topology {a.topology}; "
          f"distnet serve --bind tcp://10.77.0.1:0 --keys KEYS ... in the server namespace; "
          f"DISTNET_RANK=i {command_line(job_args('sync', 2, a.epochs, '--codec', 'CODEC'))} "
          f"--server ADDR --keys KEYS in w1/w2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--codecs", default="none,topk:10,topk:1")
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--topology", default="bridge", choices=("bridge", "pairwise"))
    ap.add_argument("--target", type=float, default=0.97)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        bench_netns(a, Path(tmp))


if __name__ == "__main__":
    main()
