"""Parameter server under load: many worker processes pushing to one async server.

W worker processes (spawn; each its own PSClient) push P gradients each to one
server process in async mode; every ``--resend-every``-th push is deliberately sent
twice (the same sequence number), so the server must recognise the copy. After a
warm-up of ``--warmup`` pushes per worker the server's RSS is read (``stats``), the
timed phase runs, and the RSS is read again. Printed: pushes applied and sent,
duplicates recognised, versions, push throughput, round-trip latency percentiles
and the RSS growth. ``run_load`` is what tests/test_ps_load.py checks.

    .venv/bin/python benchmarks/bench_ps_reliability.py [--workers 16] [--pushes 500]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from typing import Any

import numpy as np

SPAWN = mp.get_context("spawn")
SHAPES = {"w": (32, 16), "b": (16,)}  # small: the machinery is measured, not the math


def _serve(queue: Any, workers: int) -> None:
    from distnet.ps import ParameterServer

    params = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    server = ParameterServer(params, optimizer="sgd", optimizer_config={"lr": 1e-3},
                             mode="async", num_workers=workers, timeout=120.0)
    queue.put(server.address)
    server.run()


def _worker(address: str, wid: int, pushes: int, resend_every: int, warmup: int,
            ready: Any, go: Any, results: Any) -> None:
    from distnet.ps import PSClient

    rng = np.random.default_rng(wid)
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    versions, latencies, deliberate = [], [], 0
    with PSClient([address], wid, timeout=120) as c:
        c.register()
        v = 0
        for t in range(pushes):
            if t == warmup:
                ready.put(wid)
                go.wait(120)
            t0 = time.perf_counter()
            ticket = c.push(grads, v)
            if resend_every and t % resend_every == resend_every - 1:
                c.resend(ticket)  # a copy the server must acknowledge and not apply
                deliberate += 1
            v = c.wait(ticket)
            if t >= warmup:
                latencies.append(time.perf_counter() - t0)
            if ticket.replies[0].header.get("duplicate"):
                raise AssertionError(f"worker {wid}: push {t} answered as a duplicate")
            versions.append(v)
        results.put({"wid": wid, "versions": versions, "latencies": latencies,
                     "deliberate": deliberate, "resends": c.resends, "end": time.time()})


def run_load(workers: int = 16, pushes: int = 500, resend_every: int = 25,
             warmup: int = 50) -> dict[str, Any]:
    """Run the load; returns the server's stats before/after and the workers' results."""
    from distnet.ps import PSClient

    queue, ready, results, go = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
    server = SPAWN.Process(target=_serve, args=(queue, workers))
    server.start()
    procs: list[Any] = []
    try:
        address = queue.get(timeout=60)
        procs = [SPAWN.Process(target=_worker, args=(address, w, pushes, resend_every, warmup,
                                                     ready, go, results))
                 for w in range(workers)]
        for p in procs:
            p.start()
        for _ in range(workers):
            ready.get(timeout=120)
        with PSClient([address], 0, timeout=60, heartbeat_interval=None) as probe:
            before = probe.stats()[0]  # stats needs no registration: worker 0 is undisturbed
            start = time.time()
            go.set()
            out = [results.get(timeout=120) for _ in range(workers)]
            after = probe.stats()[0]
        for p in procs:
            p.join(30)
    finally:
        for p in [*procs, server]:
            if p.is_alive():
                p.kill()
            p.join(10)
    latencies = np.array([x for r in out for x in r["latencies"]])
    elapsed = max(r["end"] for r in out) - start
    return {"workers": workers, "pushes": pushes, "before": before, "after": after,
            "results": sorted(out, key=lambda r: r["wid"]), "elapsed": elapsed,
            "timed_pushes": latencies.size, "pushes_per_s": latencies.size / elapsed,
            "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
            "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
            "max_ms": 1e3 * float(latencies.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--pushes", type=int, default=500, help="pushes per worker")
    ap.add_argument("--resend-every", type=int, default=25, help="deliberate resends (0: none)")
    ap.add_argument("--warmup", type=int, default=50, help="pushes per worker before timing")
    args = ap.parse_args()
    r = run_load(args.workers, args.pushes, args.resend_every, args.warmup)
    after, before = r["after"], r["before"]
    sent = args.workers * args.pushes
    resends = sum(x["resends"] for x in r["results"])
    print(f"\n{args.workers} worker processes x {args.pushes} pushes, async, one server "
          f"({sum(np.prod(s) for s in SHAPES.values())} float32 parameters), tcp://127.0.0.1")
    print(f"  updates sent / applied     {sent} / {after['pushes_applied']} "
          f"(server version {after['version']})")
    print(f"  resends / duplicates       {resends} / {after['duplicates']} (none applied twice)")
    print(f"  throughput                 {r['pushes_per_s']:.0f} pushes/s "
          f"({r['timed_pushes']} timed pushes in {r['elapsed']:.2f} s)")
    print(f"  round trip p50 / p99 / max {r['p50_ms']:.2f} / {r['p99_ms']:.2f} / "
          f"{r['max_ms']:.2f} ms")
    print(f"  server RSS                 {before['rss_bytes'] / 2**20:.1f} -> "
          f"{after['rss_bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
