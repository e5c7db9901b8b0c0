"""Parameter-server throughput against raw ZeroMQ, measured in the same run.

One round trip = a worker sends a 16 MB float32 gradient and gets 16 MB of
parameters back into its parameter array (the raw echo copies the reply into it
as PSClient does with ``out=``; a second raw row copies nothing):

- raw:  DEALER -> ROUTER that echoes the same frames (copy=False both ways);
- raw, held: the same echo, but the server busy-waits ``--hold-ms`` before each
        reply (what any server-side work costs the round trip, with no work);
- raw, kept: the same echo from a server process that keeps freed message buffers
        for reuse (``transport.keep_receive_buffers``), as distnet's server processes
        do: the same allocator on both sides;
- ps:   PSClient.push_pull -> ParameterServer (validation, NaN check, SGD with
        momentum applied in place) -> the new parameters; one shard, and ``--parts``
        shards served by one loop in one process (``distnet.ps.group``: each shard's
        update overlaps the transfer of the others, BytePS-style partitioning).

Servers run in their own processes (spawn), like a real deployment, so the
worker's Python and the server's do not share a GIL. Blocks of raw and ps round
trips alternate so machine noise hits both; the table gives medians and the
ratio of the medians (ps throughput as a fraction of raw).

    .venv/bin/python benchmarks/bench_ps_throughput.py [--mb 16] [--iters 20] [--blocks 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any

import numpy as np
import zmq


def _echo_server(queue, hold_s: float = 0.0, keep: bool = False) -> None:
    if keep:  # the allocator setting distnet's server processes use
        from distnet.ps.transport import keep_receive_buffers

        keep_receive_buffers()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:0")
    queue.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[-1].bytes == b"stop":
            break
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < hold_s:  # busy, like a server computing
            pass
        sock.send_multipart(frames, copy=False)
    sock.close(linger=1000)


class _NoUpdate:
    """An optimizer that reads nothing and changes nothing: isolates the PS machinery."""

    def __init__(self, params, lr):
        self.lr = lr

    def step(self) -> None:
        pass


def _ps_server(queue, n: int, optimizer: str, mode: str, parts: int = 1) -> None:
    from distnet.optim.blas import limit_threads
    from distnet.ps.group import shard_group
    from distnet.ps.transport import keep_receive_buffers

    limit_threads(1)  # as distnet's server processes do (dist/server_role.serve),
    keep_receive_buffers()  # which also keep message buffers for reuse

    params = {"w": np.zeros(n, np.float32)}
    # the wire is what is measured: no same-host shared memory (it would bypass ZeroMQ)
    group = shard_group(params, parts, optimizer=_NoUpdate if optimizer == "none" else optimizer,
                        optimizer_config={"lr": 1e-3}, mode=mode, num_workers=1,
                        shared_memory=False)
    queue.put(group.addresses)
    group.run()


def _start(target, *args) -> tuple[mp.Process, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(queue, *args), daemon=True)
    proc.start()
    return proc, queue.get(timeout=120)


def _time_raw(sock: zmq.Socket, grad: np.ndarray, iters: int,
              out: np.ndarray | None) -> list[float]:
    """Round trips of the bare echo; the reply is copied into ``out`` (as a worker puts
    parameters into its model, and as PSClient does with ``out=``) unless it is None."""
    out_t = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sock.send_multipart([b"h", grad], copy=False)
        frames = sock.recv_multipart(copy=False)
        got = np.frombuffer(frames[1].buffer, np.float32)
        if out is not None:
            np.copyto(out, got)
        out_t.append(time.perf_counter() - t0)
    return out_t


def _time_ps(client, grad: np.ndarray, iters: int, version: int,
             out: np.ndarray | None) -> tuple[list[float], int]:
    """push_pull round trips; the parameters land in ``out`` (None: zero-copy views of the
    reply, possible with one shard only)."""
    out_t = []
    dest = None if out is None else {"w": out}
    for _ in range(iters):
        t0 = time.perf_counter()
        version, _ = client.wait(client.push_pull({"w": grad}, version, out=dest))
        out_t.append(time.perf_counter() - t0)
    return out_t, version


def _time_update(n: int, optimizer: str, iters: int) -> list[float]:
    """The server's optimizer step alone, in this process (for the decomposition)."""
    from distnet.nn.module import Parameter
    from distnet.optim import build_optimizer

    p = Parameter(np.zeros(n, np.float32), "w")
    p.grad = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    opt = build_optimizer(optimizer, [("w", p)], lr=1e-3)
    out = []
    for _ in range(iters + 2):
        t0 = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t0)
    return out[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=16.0, help="gradient size in MB (float32)")
    ap.add_argument("--iters", type=int, default=20, help="round trips per block")
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks per method")
    ap.add_argument("--optimizer", default="momentum")
    ap.add_argument("--mode", default="sync", choices=["sync", "async"])
    ap.add_argument("--parts", type=int, default=8,
                    help="shards in the one server process of the partitioned row")
    ap.add_argument("--hold-ms", type=float, default=3.0,
                    help="how long the held echo busy-waits before each reply")
    args = ap.parse_args()

    from distnet.ps import PSClient

    n = int(args.mb * 1e6 / 4)
    grad = np.random.default_rng(1).standard_normal(n).astype(np.float32) * 1e-3
    echo_proc, echo_addr = _start(_echo_server)
    held_proc, held_addr = _start(_echo_server, args.hold_ms / 1e3)
    kept_proc, kept_addr = _start(_echo_server, 0.0, True)
    ps_proc, ps_addr = _start(_ps_server, n, args.optimizer, args.mode)
    bare_proc, bare_addr = _start(_ps_server, n, "none", args.mode)
    parts_proc, parts_addr = _start(_ps_server, n, args.optimizer, args.mode, args.parts)
    ctx = zmq.Context.instance()
    raw, held, kept = (ctx.socket(zmq.DEALER) for _ in range(3))
    raw.connect(echo_addr)
    held.connect(held_addr)
    kept.connect(kept_addr)
    clients = [PSClient(addrs, 0, timeout=60) for addrs in (ps_addr, bare_addr, parts_addr)]
    versions = []
    for c in clients:
        c.register()
        versions.append(c.wait(c.pull())[0])

    out = np.zeros_like(grad)  # the worker's parameters: every method delivers into them
    _time_raw(raw, grad, 3, out)  # warm up connections and page in buffers
    _time_raw(held, grad, 3, out)
    _time_raw(kept, grad, 3, out)
    for i, c in enumerate(clients):
        _, versions[i] = _time_ps(c, grad, 3, versions[i], out)
    raw_t, view_t, held_t, ps_t, bare_t, parts_t, block_ratios = [], [], [], [], [], [], []
    kept_t: list[float] = []
    ps_view_t: list[float] = []
    for _ in range(args.blocks):
        r = _time_raw(raw, grad, args.iters, out)
        view_t += _time_raw(raw, grad, args.iters, None)
        held_t += _time_raw(held, grad, args.iters, out)
        kept_t += _time_raw(kept, grad, args.iters, out)
        p, versions[0] = _time_ps(clients[0], grad, args.iters, versions[0], out)
        v, versions[0] = _time_ps(clients[0], grad, args.iters, versions[0], None)
        ps_view_t += v
        b, versions[1] = _time_ps(clients[1], grad, args.iters, versions[1], out)
        q, versions[2] = _time_ps(clients[2], grad, args.iters, versions[2], out)
        raw_t, ps_t, bare_t, parts_t = raw_t + r, ps_t + p, bare_t + b, parts_t + q
        block_ratios.append(statistics.median(r) / statistics.median(q))
    upd_t = _time_update(n, args.optimizer, args.iters)
    stats = clients[0].stats()[0]  # the one-shard server
    for c in clients:
        c.shutdown()
        c.close()
    for sock in (raw, held, kept):
        sock.send_multipart([b"h", b"stop"])
        sock.close(linger=1000)
    for proc in (echo_proc, held_proc, kept_proc, ps_proc, bare_proc, parts_proc):
        proc.join(10)

    nbytes = 2 * grad.nbytes  # there and back
    rows = [("raw pyzmq echo (DEALER/ROUTER)", raw_t),
            ("raw echo, reply not copied out", view_t),
            (f"raw echo, reply held {args.hold_ms:g} ms (busy)", held_t),
            ("raw echo, server keeps buffers as ps", kept_t),
            (f"ps push_pull, {args.parts} shards in 1 process", parts_t),
            (f"ps push_pull, 1 shard ({args.optimizer}, {args.mode})", ps_t),
            ("ps push_pull, 1 shard, reply not copied out", ps_view_t),
            ("ps push_pull (no-op optimizer)", bare_t),
            (f"{args.optimizer} step alone (4M floats)", upd_t)]
    print(f"\n{grad.nbytes / 1e6:.1f} MB float32 each way over tcp://127.0.0.1, "
          f"{len(raw_t)} round trips per method in {args.blocks} alternating blocks\n")
    print(f"{'method':<40}{'median ms':>10}{'p10 ms':>9}{'p90 ms':>9}{'GB/s':>8}")
    for name, ts in rows:
        ts_ms = sorted(t * 1e3 for t in ts)
        med = statistics.median(ts_ms)
        p10, p90 = ts_ms[len(ts_ms) // 10], ts_ms[(9 * len(ts_ms)) // 10]
        rate = f"{nbytes / (med / 1e3) / 1e9:8.2f}" if "alone" not in name else f"{'':>8}"
        print(f"{name:<40}{med:>10.2f}{p10:>9.2f}{p90:>9.2f}{rate}")
    ratio = statistics.median(raw_t) / statistics.median(parts_t)
    one = statistics.median(raw_t) / statistics.median(ps_t)
    bare = statistics.median(raw_t) / statistics.median(bare_t)
    print(f"\nps throughput / raw throughput (ratio of medians): {ratio:.1%} (target >= 85%), "
          f"{args.parts} shards in one server process")
    print(f"median of per-block ratios (adjacent in time):     "
          f"{statistics.median(block_ratios):.1%}")
    print(f"against the raw echo that copies nothing out:      "
          f"{statistics.median(view_t) / statistics.median(parts_t):.1%}")
    print(f"against a raw echo keeping its buffers as ps does: "
          f"{statistics.median(kept_t) / statistics.median(parts_t):.1%}")
    print(f"one shard (update between receive and reply):      {one:.1%}")
    print(f"one shard, neither copying the reply out:          "
          f"{statistics.median(view_t) / statistics.median(ps_view_t):.1%}")
    print(f"one shard, no optimizer update (PS machinery):     {bare:.1%}")
    print(f"raw echo holding each reply {args.hold_ms:g} ms:            "
          f"{statistics.median(raw_t) / statistics.median(held_t):.1%}")
    print(f"server-side optimizer step, mean: "
          f"{stats['update_seconds'] / max(1, stats['version']) * 1e3:.2f} ms")
    print(f"server: version {stats['version']}, rejected {stats['rejected']}, "
          f"bytes in {stats['bytes_in'] / 1e6:.0f} MB, out {stats['bytes_out'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
