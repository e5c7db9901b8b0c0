"""Issue 3, table 1: one sync step through the parameter server vs one ``allreduce`` step.

    .venv/bin/python benchmarks/bench_sync_vs_allreduce.py [--rounds 8] [--epochs 3]
        [--profile-rounds 3] [--iters 200]

Part 1 runs real 2-worker jobs (lenet300, global batch 128, MNIST 7,000/1,000), sync with
one server then allreduce, alternating, and reads per-step times from the step records
the workers write (see bench_dist.py), plus the mean communication time per step each
update records (``push_pull_ms``, ``allreduce_ms``), the server's optimizer time and the
CPU every process of the job used per step. The ratio of the medians is the issue's
figure (target <= 1.5x).

Part 2 times the pieces of a step, each alone, in alternating rounds of the same run:
forward + backward of one worker's 64 examples, the momentum step, a bare pyzmq round
trip of the same frames, a PS push_pull with 1 and with 2 workers and no compute (the
client's send and the server's handling timed inside by wrapping those methods), and an
MPI Allreduce of the same 1.07 MB. That says what the sync step spends its extra time on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_dist import (
    BATCH,
    PY,
    ROOT,
    Run,
    command_line,
    data_spec,
    epochs_of,
    job_args,
    job_env,
    med,
    pct,
    run_train,
    step_field,
    step_times,
)


def epoch_step_times(run: Run) -> list[float]:
    """Each worker's epoch seconds / that epoch's steps, epochs >= 2 (a cross-check)."""
    out = []
    for records in run.workers:
        for e in epochs_of(records):
            steps = [r["step"] for r in records if r["kind"] == "step" and r["epoch"] == e["epoch"]]
            if e["epoch"] >= 2 and steps:
                out.append(e["seconds"] / (max(steps) - min(steps) + 1))
    return out


# ---- part 1: real jobs -------------------------------------------------------------------
# name -> (mode, extra options, table label, environment); each chosen variant runs in
# every round ("allreduce", the reference, always)
VARIANTS = {"sync": ("sync", (), "sync (server rank)", {}),
            "colocated": ("sync", ("--colocate",), "sync --colocate", {}),
            "zmq": ("sync", ("--colocate",), "  same, headers by ZeroMQ",
                    {"DISTNET_LOCAL_CHANNEL": "0"}),
            "frames": ("sync", ("--colocate", "--no-shared-memory"), "  same, no shared memory",
                       {}),
            "allreduce": ("allreduce", (), "allreduce (MPI)", {})}


def bench_jobs(a: argparse.Namespace, tmp: Path) -> None:
    """Table 1: per-step times of real 2-worker sync and allreduce jobs, alternating."""
    names = [n for n in VARIANTS if n in a.variants or n == "allreduce"]
    times: dict[str, list[float]] = {m: [] for m in names}
    comm: dict[str, list[float]] = {m: [] for m in names}
    cpu: dict[str, list[float]] = {m: [] for m in names}
    setup: dict[str, list[tuple[float, float]]] = {m: [] for m in names}
    per_epoch: dict[str, list[float]] = {m: [] for m in names}
    update_ms: dict[str, list[float]] = {m: [] for m in names}
    round_ratios: dict[str, list[float]] = {m: [] for m in names[:-1]}
    for r in range(a.rounds):
        per_round = {}
        for name in (names if r % 2 == 0 else names[::-1]):
            mode, extra, _, env = VARIANTS[name]
            # the same job with --epochs 0: start-up and shut-down only (wall, CPU)
            bare = run_train(job_args(mode, 2, 0, *extra, seed=r), tmp / f"step0-{name}-{r}",
                             env=env)
            setup[name].append((bare.wall_s, bare.cpu_s))
            run = run_train(job_args(mode, 2, a.epochs, *extra, seed=r), tmp / f"step-{name}-{r}",
                            env=env)
            ts = [t for w in run.workers for t in step_times(w)]
            times[name] += ts
            per_round[name] = med(ts)
            n_steps = max(x["step"] for x in run.chief if x["kind"] == "step") + 1
            cpu[name].append(1e3 * (run.cpu_s - bare.cpu_s) / n_steps)
            per_epoch[name] += epoch_step_times(run)
            key = "push_pull_ms" if mode == "sync" else "allreduce_ms"
            comm[name] += [x for w in run.workers for x in step_field(w, key)]
            if mode == "sync" and run.server:
                s = run.server[-1]
                update_ms[name].append(1e3 * s["update_seconds"] / max(1, s["version"]))
        for name in round_ratios:
            round_ratios[name].append(per_round[name] / per_round["allreduce"])
    print(f"\nlenet300, global batch {BATCH}, 2 workers, {data_spec()}; {a.rounds} rounds x "
          f"{a.epochs} epochs, per-step times between the workers' step records (epochs >= 2)\n")
    print(f"{'job':<22}{'step ms':>9}{'p10':>8}{'p90':>8}{'epoch/steps':>13}{'comm ms':>9}"
          f"{'other ms':>10}{'CPU ms/step':>13}{'setup s':>9}")
    for name in names:
        t, c = 1e3 * med(times[name]), med(comm[name])
        print(f"{VARIANTS[name][2]:<22}{t:9.2f}{1e3 * pct(times[name], .1):8.2f}"
              f"{1e3 * pct(times[name], .9):8.2f}{1e3 * med(per_epoch[name]):13.2f}{c:9.2f}"
              f"{t - c:10.2f}{med(cpu[name]):13.2f}"
              f"{med([w for w, _ in setup[name]]):9.2f}")
    print()
    for name, ratios in round_ratios.items():
        ratio = med(times[name]) / med(times["allreduce"])
        print(f"{VARIANTS[name][2]} / allreduce per-step time (ratio of medians): {ratio:.2f}x "
              f"(target <= 1.5x); per round: {', '.join(f'{x:.2f}' for x in ratios)}")
    steps = ", ".join(f"{VARIANTS[n][2].strip()} {med(v):.2f}" for n, v in update_ms.items() if v)
    print(f"server optimizer step, ms (update_seconds / version; wall time): {steps}")
    print("epoch/steps: each worker's epoch time / the epoch's steps (epochs >= 2), a check; "
          "comm ms: sync = push_pull_ms (gradient out, wait for the round, parameters back); "
          "allreduce = allreduce_ms (the last step of each 10-step window); other = step - comm "
          "(forward, backward, local optimizer in allreduce); CPU ms/step = (CPU of all the "
          "job's processes - CPU of the same job with --epochs 0) / steps; setup s = wall "
          "time of the --epochs 0 job. --colocate: the server is a thread of worker rank 0, "
          "which reaches it over inproc:// and the same-host channel (2 processes, as "
          "allreduce)")
    print(f"command: {command_line(job_args('sync', 2, a.epochs))}  (and --colocate; "
          f"--mode allreduce)")


OPT = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}  # the lenet300 recipe's optimizer


def lenet300_params() -> dict[str, Any]:
    """name -> float32 array of the seeded lenet300's parameters (what the server holds)."""
    import numpy as np

    from distnet.models import build_model

    model = build_model("lenet300", (1, 28, 28), 10, seed=0)
    return {n: np.ascontiguousarray(p.data) for n, p in model.named_parameters()}


def timed(record: list[float], fn: Any) -> Any:
    """``fn`` wrapped to append its duration (ms) to ``record``."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(1e3 * (time.perf_counter() - t0))

    return wrapper


def rank_main(kind: str, iters: int, out_dir: str) -> None:
    """Under mpiexec: ``ps``: rank 0 serves, the others push_pull in a loop (no compute);
    ``raw``: rank 0 echoes the same frames with bare pyzmq (DEALER -> ROUTER, zero-copy);
    ``allreduce``: every rank Allreduces a lenet300-sized buffer. Every rank writes
    ``{name: [ms, ...]}`` to ``out_dir/rank<k>.json``: ``rt`` the round trips; in ``ps``
    also ``send`` (the client encoding and queueing a push_pull), ``handle`` (the server
    handling one message: decode, checks, summing; the round's last also the update and
    the replies) and ``update`` (the optimizer step), timed by wrapping those methods."""
    import numpy as np
    from mpi4py import MPI

    comm, params = MPI.COMM_WORLD, lenet300_params()
    rec: dict[str, list[float]] = {"rt": []}
    if kind == "allreduce":
        flat = np.concatenate([a.ravel() for a in params.values()])
        for _ in range(iters + 5):
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, flat)
            rec["rt"].append(1e3 * (time.perf_counter() - t0))
            flat *= np.float32(0.5)
    elif kind == "raw":
        import zmq

        sock = zmq.Context.instance().socket(zmq.ROUTER if comm.rank == 0 else zmq.DEALER)
        if comm.rank == 0:
            sock.bind("tcp://127.0.0.1:0")
            comm.bcast(sock.getsockopt_string(zmq.LAST_ENDPOINT), root=0)
            for _ in range(iters + 5):
                sock.send_multipart(sock.recv_multipart(copy=False), copy=False)
            sock.close(linger=1000)
            return
        sock.connect(comm.bcast(None, root=0))
        frames = [b"header", *params.values()]
        for _ in range(iters + 5):
            t0 = time.perf_counter()
            sock.send_multipart(frames, copy=False)
            got = sock.recv_multipart(copy=False)
            for f, a in zip(got[1:], params.values(), strict=True):
                np.copyto(a, np.frombuffer(f.buffer, np.float32).reshape(a.shape))
            rec["rt"].append(1e3 * (time.perf_counter() - t0))
        sock.close(linger=1000)
    elif comm.rank == 0:
        from distnet.ps import ParameterServer

        server = ParameterServer(params, optimizer="momentum", optimizer_config=OPT,
                                 mode="sync", num_workers=comm.size - 1)
        rec = {"handle": [], "update": []}
        # ZeroMQ and same-host messages both end in _handle_message; a round's step is
        # apply_accumulated
        server._handle_message = timed(rec["handle"], server._handle_message)
        server.state.apply_accumulated = timed(rec["update"], server.state.apply_accumulated)
        comm.bcast(server.address, root=0)
        server.run()
        n = len(rec["handle"]) - len(rec["update"]) * (comm.size - 1)  # register, pull...
        rec = {"handle": rec["handle"][n:], "update": rec["update"]}
    else:
        from distnet.ps import PSClient

        client = PSClient([comm.bcast(None, root=0)], comm.rank - 1)
        client.register()
        client.wait(client.barrier())
        out = {n: a.copy() for n, a in params.items()}
        rng = np.random.default_rng(comm.rank)
        grads = {n: 1e-3 * rng.standard_normal(a.shape, np.float32) for n, a in params.items()}
        version, _ = client.wait(client.pull(out=out))
        rec["send"] = []
        client._send = timed(rec["send"], client._send)
        for _ in range(iters + 5):
            t0 = time.perf_counter()
            version, _ = client.wait(client.push_pull(grads, version, out=out))
            rec["rt"].append(1e3 * (time.perf_counter() - t0))
        client.wait(client.barrier())
        if comm.rank == 1:
            client.shutdown()
        client.close()
        rec["send"] = rec["send"][:len(rec["rt"])]
    skip = 5 * max(1, comm.size - 1)  # warm-up iterations
    Path(out_dir, f"rank{comm.rank}.json").write_text(
        json.dumps({k: v[skip if k == "handle" else 5:] for k, v in rec.items()}))


def time_ranks(kind: str, n: int, iters: int) -> dict[str, list[float]]:
    """``{name: ms per iteration}`` of every rank of an ``n``-rank ``rank_main(kind)`` job."""
    from distnet.dist.launcher import build_command

    merged: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-dist-ranks-") as out:
        cmd = build_command([str(Path(__file__).resolve()), "--rank", kind, "--iters",
                             str(iters), "--out", out], n)
        subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, cwd=ROOT)
        for f in sorted(Path(out).glob("rank*.json")):
            for key, values in json.loads(f.read_text()).items():
                merged.setdefault(key, []).extend(values)
    return merged


def time_compute(reps: int) -> tuple[list[float], list[float]]:
    """ms of one worker's forward + backward (64 examples: half the global batch, one
    BLAS thread as under mpiexec) and of a momentum step on the lenet300 parameters."""
    import numpy as np

    from distnet.models import build_model
    from distnet.nn import CrossEntropyLoss, skip_input_grad
    from distnet.optim import build_optimizer
    from distnet.train import train_step

    model = build_model("lenet300", (1, 28, 28), 10, seed=0)
    skip_input_grad(model)
    opt = build_optimizer("momentum", model, **OPT)
    crit = CrossEntropyLoss()
    rng = np.random.default_rng(0)
    x = rng.random((BATCH // 2, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, BATCH // 2).astype(np.int64)
    fb, up = [], []
    for i in range(reps + 5):
        t0 = time.perf_counter()
        train_step(model, crit, x, y)
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= 5:
            fb.append(1e3 * (t1 - t0))
            up.append(1e3 * (t2 - t1))
    return fb, up


def bench_pieces(a: argparse.Namespace) -> None:
    """Table 2: the pieces of a step, each alone, in alternating rounds."""
    res: dict[str, list[float]] = {}
    env = job_env()
    for _ in range(a.profile_rounds):  # alternate so drifting load hits every piece alike
        for tag, kind, n in (("ps2", "ps", 3), ("ar", "allreduce", 2), ("ps1", "ps", 2),
                             ("raw", "raw", 2)):
            for key, values in time_ranks(kind, n, a.iters).items():
                res.setdefault(tag if key == "rt" else f"{tag}_{key}", []).extend(values)
        # the compute figures in a child with the one BLAS thread the ranks get
        out = subprocess.run([PY, __file__, "--compute", "--iters", str(a.iters)],
                             capture_output=True, text=True, env=env, check=True, timeout=300)
        fb, up = json.loads(out.stdout.strip().splitlines()[-1])
        res.setdefault("fb", []).extend(fb)
        res.setdefault("up", []).extend(up)
    n = sum(x.size for x in lenet300_params().values())
    print(f"\nthe pieces of a lenet300 step, each alone ({a.profile_rounds} alternating rounds x "
          f"{a.iters} iterations; medians, ms)\n")
    rows = [("fb", "forward + backward, 64 examples (1 BLAS thread)"),
            ("up", f"momentum step, {n:,} params (server, or each allreduce rank)"),
            ("raw", "bare pyzmq round trip of the same 7 frames (echo, copy out)"),
            ("ps1", "PS push_pull, 1 worker, no compute (1.07 MB each way + update)"),
            ("ps1_send", "  of which: client encodes and queues the push_pull"),
            ("ps1_handle", "  of which: server handles it (decode, checks, update, reply)"),
            ("ps1_update", "    of which: the server's optimizer step"),
            ("ps2", "PS push_pull, 2 workers at once, no compute"),
            ("ps2_send", "  of which: client encodes and queues the push_pull"),
            ("ps2_handle", "  server: one message (x2 per round, one after the other)"),
            ("ps2_update", "  server: optimizer step (once per round)"),
            ("ar", "MPI Allreduce of 1.07 MB, 2 ranks, no compute")]
    print(f"{'piece':<66}{'median':>8}{'p10':>8}{'p90':>8}")
    for key, name in rows:
        print(f"{name:<66}{med(res[key]):8.2f}{pct(res[key], .1):8.2f}{pct(res[key], .9):8.2f}")
    fb, ps2, ar, up = (med(res[k]) for k in ("fb", "ps2", "ar", "up"))
    print(f"\nfloor of a step: sync {fb + ps2:.2f} ms (fb + ps2), allreduce {fb + ar + up:.2f} ms "
          f"(fb + ar + up): ratio {(fb + ps2) / (fb + ar + up):.2f}x")

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8, help="rounds of real jobs")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each real job")
    ap.add_argument("--profile-rounds", type=int, default=3, help="rounds of the pieces")
    ap.add_argument("--iters", type=int, default=200, help="iterations per piece and round")
    ap.add_argument("--variants", default="sync,colocated,zmq,frames",
                    help=f"the server jobs to run, of {', '.join(list(VARIANTS)[:-1])} "
                         "(allreduce always runs)")
    ap.add_argument("--skip-jobs", action="store_true", help="only the pieces")
    ap.add_argument("--skip-pieces", action="store_true", help="only the jobs")
    ap.add_argument("--compute", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", choices=("ps", "raw", "allreduce"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank:  # a rank of a pieces job, under mpiexec
        rank_main(a.rank, a.iters, a.out)
        return
    if a.compute:
        print(json.dumps(time_compute(a.iters)))
        return
    if not a.skip_jobs:
        with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
            bench_jobs(a, Path(tmp))
    if not a.skip_pieces:
        bench_pieces(a)


if __name__ == "__main__":
    main()
