"""The parameter server over real sockets on 127.0.0.1: modes, idempotency, bad input.

Servers run in a thread (one test runs one in a subprocess); simulated workers are
threads, each with its own PSClient.
"""

from __future__ import annotations

import multiprocessing as mp
import platform
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from distnet.nn.module import Parameter
from distnet.optim import build_optimizer
from distnet.ps import ParameterServer, PSClient, PSError, PSTimeoutError, plan_shards, split
from distnet.ps.protocol import decode, dense_entries, encode
from distnet.ps.transport import connect_dealer, recv_frames

RNG = np.random.default_rng(0)
PARAMS = {"emb": RNG.standard_normal((40, 8)).astype(np.float32),
          "w": RNG.standard_normal((8, 4)).astype(np.float32),
          "b": np.zeros(4, np.float32)}


def grads_for(wid: int, t: int, params=PARAMS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 * wid + t)
    return {k: rng.standard_normal(a.shape).astype(a.dtype) for k, a in params.items()}


@contextmanager
def serving(params=PARAMS, **kw):
    kw.setdefault("timeout", 10.0)
    server = ParameterServer(params, **kw)
    server.start_thread()
    try:
        yield server
    finally:
        server.stop()


def run_workers(n: int, fn) -> None:
    """fn(wid) in n threads; re-raise the first failure."""
    errors: list[BaseException] = []

    def target(wid):
        try:
            fn(wid)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]


def reference(optimizer: str, config: dict, grad_steps: list[dict[str, np.ndarray]]):
    """One local optimizer applying each (already averaged) gradient in turn."""
    params = [(k, Parameter(a.copy(), k)) for k, a in PARAMS.items()]
    opt = build_optimizer(optimizer, params, **config)
    for g in grad_steps:
        for k, p in params:
            p.grad = g[k]
        opt.step()
    return {k: p.data for k, p in params}


def train_sync(addresses, n: int, steps: int) -> dict[int, dict[str, np.ndarray]]:
    results = {}

    def worker(wid):
        with PSClient(addresses, wid, timeout=20) as c:
            c.register()
            v, _ = c.wait(c.pull())
            for t in range(steps):
                v, p = c.wait(c.push_pull(grads_for(wid, t), v))
                assert v == t + 1
            results[wid] = {k: a.copy() for k, a in p.items()}

    run_workers(n, worker)
    return results


# ---- sync -------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 4])
def test_sync_equals_one_worker_taking_the_averaged_step(n):
    config = {"lr": 0.1, "weight_decay": 1e-3}
    steps = 3
    with serving(optimizer="momentum", optimizer_config=config, mode="sync",
                 num_workers=n) as server:
        results = train_sync([server.address], n, steps)
        stats = server.stats()
    mean = [{k: np.mean([grads_for(w, t)[k] for w in range(n)], axis=0) for k in PARAMS}
            for t in range(steps)]
    ref = reference("momentum", config, mean)
    assert set(results) == set(range(n))
    for res in results.values():
        for k in PARAMS:
            np.testing.assert_allclose(res[k], ref[k], rtol=1e-5, atol=1e-6)
    assert stats["version"] == steps and stats["pushes_applied"] == n * steps


def test_two_shards_give_the_same_result_as_one():
    shapes = {k: a.shape for k, a in PARAMS.items()}
    plan = plan_shards(shapes, 2, min_split_bytes=64)
    assert any(p.split for p in plan.pieces)  # "emb" is cut between rows
    kw = {"optimizer": "adam", "optimizer_config": {"lr": 0.01}, "mode": "sync",
          "num_workers": 2}
    with serving(**kw) as one:
        single = train_sync([one.address], 2, 3)
    servers = [ParameterServer(part, server_id=i, timeout=10.0, **kw)
               for i, part in enumerate(split(PARAMS, plan))]
    for s in servers:
        s.start_thread()
    try:
        with PSClient([s.address for s in servers], 0) as probe:
            layout = probe.register()
        assert layout.names == list(PARAMS) and layout.plan == plan
        sharded = train_sync([s.address for s in servers], 2, 3)
    finally:
        for s in servers:
            s.stop()
    for k in PARAMS:
        np.testing.assert_allclose(sharded[0][k], single[0][k], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(sharded[0][k], sharded[1][k])


def test_sync_timeout_names_the_missing_worker():
    with serving(mode="sync", num_workers=2, timeout=0.3) as server:
        with PSClient([server.address], 0, timeout=5) as c:
            c.register()
            with pytest.raises(PSError, match=r"timed out after 0.3 s waiting for gradients "
                                              r"from workers \[1\] for version 0"):
                c.wait(c.push_pull(grads_for(0, 0), 0))
            assert server.stats()["timeouts"] == 1


# ---- async ------------------------------------------------------------------------------
def test_async_applies_every_push_and_counts_staleness():
    lr, n, pushes = 0.1, 2, 5
    with serving(optimizer="sgd", optimizer_config={"lr": lr}, mode="async",
                 num_workers=n) as server:
        def worker(wid):
            with PSClient([server.address], wid) as c:
                c.register()
                for t in range(pushes):  # always computed on version 0: staleness grows
                    c.wait(c.push(grads_for(wid, t), 0))

        run_workers(n, worker)
        with PSClient([server.address], 0) as c:
            c.register()
            version, params = c.wait(c.pull())
            stats = c.stats()[0]
    assert version == n * pushes == stats["pushes_applied"]
    assert stats["staleness_hist"] == dict.fromkeys(range(n * pushes), 1)
    total = {k: sum(grads_for(w, t)[k] for w in range(n) for t in range(pushes)) for k in PARAMS}
    for k in PARAMS:
        np.testing.assert_allclose(params[k], PARAMS[k] - lr * total[k], rtol=1e-5, atol=1e-5)


def test_async_lr_staleness_scaling():
    g = grads_for(0, 0)
    with serving(optimizer="sgd", optimizer_config={"lr": 1.0}, mode="async",
                 lr_staleness_scaling=True) as server, PSClient([server.address], 0) as c:
        c.register()
        for _ in range(3):
            c.wait(c.push(g, 0))  # staleness 0, 1, 2
        _, params = c.wait(c.pull())
    for k in PARAMS:
        np.testing.assert_allclose(params[k], PARAMS[k] - g[k] * (1 + 1 / 2 + 1 / 3), rtol=1e-5)


# ---- ssp --------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0, 1, 2])
def test_ssp_bound_is_never_exceeded(s):
    n, steps = 3, 8
    gaps: dict[int, list[int]] = {}
    with serving(optimizer="sgd", optimizer_config={"lr": 0.01}, mode="ssp", num_workers=n,
                 staleness=s) as server:
        def worker(wid):
            delay = [0.0, 0.01, 0.05][wid]  # worker 2 is slow: the others must wait for it
            with PSClient([server.address], wid) as c:
                c.register()
                v, _ = c.wait(c.pull())
                for t in range(steps):
                    time.sleep(delay)
                    c.wait(c.push(grads_for(wid, t), v))
                    slowest = c.wait(c.clock(t + 1))  # answered only within the bound
                    gaps.setdefault(wid, []).append(t + 1 - slowest)
                    v, _ = c.wait(c.pull())

        run_workers(n, worker)
        stats = server.stats()
    assert max(max(g) for g in gaps.values()) <= s
    assert stats["max_clock_gap"] == max(max(g) for g in gaps.values())
    assert stats["max_clock_gap"] == s  # the fast worker did run ahead as far as allowed
    assert stats["pushes_applied"] == n * steps
    assert stats["clocks"] == {str(w): steps for w in range(n)}  # wire form: string keys


def test_ssp_zero_is_a_barrier_with_sync_sums():
    """s = 0: nobody passes clock c before all reach it; with plain SGD and gradients that
    do not depend on the parameters, the result is sync's with lr * n."""
    n, steps, lr = 2, 3, 0.05
    with serving(optimizer="sgd", optimizer_config={"lr": lr}, mode="ssp", num_workers=n,
                 staleness=0) as server:
        def worker(wid):
            with PSClient([server.address], wid) as c:
                c.register()
                for t in range(steps):
                    c.wait(c.push(grads_for(wid, t), t))
                    assert c.wait(c.clock(t + 1)) == t + 1
        run_workers(n, worker)
        with PSClient([server.address], 0) as c:
            c.register()
            _, ssp_params = c.wait(c.pull())
    with serving(optimizer="sgd", optimizer_config={"lr": lr * n}, mode="sync",
                 num_workers=n) as server:
        sync_params = train_sync([server.address], n, steps)[0]
    for k in PARAMS:
        np.testing.assert_allclose(ssp_params[k], sync_params[k], rtol=1e-5, atol=1e-6)


def test_ssp_timeout_names_the_slowest_worker():
    with serving(mode="ssp", num_workers=2, staleness=1, timeout=0.3) as server:
        with PSClient([server.address], 0, timeout=5) as c:
            c.register()
            assert c.wait(c.clock(1)) == 0  # within the bound
            with pytest.raises(PSError, match=r"slowest worker \(1, clock 0\) to reach clock 1"):
                c.wait(c.clock(2))


def test_barrier_waits_for_everyone():
    done: dict[int, float] = {}
    with serving(mode="async", num_workers=3) as server:
        start = time.monotonic()

        def worker(wid):
            with PSClient([server.address], wid) as c:
                c.register()
                if wid == 2:
                    time.sleep(0.3)
                c.wait(c.barrier())
                done[wid] = time.monotonic() - start

        run_workers(3, worker)
    assert min(done.values()) >= 0.3


# ---- idempotency and bad input ----------------------------------------------------------------
class RawWorker:
    """A DEALER speaking the protocol by hand, to send what a client never would."""

    def __init__(self, address):
        self.sock = connect_dealer(address)

    def rpc(self, frames, timeout=5.0):
        self.sock.send_multipart(frames, copy=False)
        got = recv_frames(self.sock, timeout)
        assert got is not None, "no reply"
        return decode(got, reply=True)

    def close(self):
        self.sock.close(linger=0)


def _push_frames(arrays, seq, ver=0, wid=0, op="push", codec="none"):
    return encode({"op": op, "wid": wid, "seq": seq, "ver": ver}, dense_entries(arrays),
                  codec=codec)


def _pull(raw, seq):
    return {k: a.copy() for k, a in raw.rpc(_push_frames({}, seq, op="pull")).arrays().items()}


def test_duplicate_seq_is_acknowledged_not_applied():
    g = grads_for(0, 0)
    with serving(optimizer="sgd", optimizer_config={"lr": 1.0}, mode="async") as server:
        raw = RawWorker(server.address)
        try:
            assert raw.rpc(_push_frames({}, 1, op="register")).header["status"] == "ok"
            frames = _push_frames(g, seq=2)
            first, again = raw.rpc(frames), raw.rpc(frames)
            assert first.header["status"] == again.header["status"] == "ok"
            assert again.header.get("duplicate") and again.header["ver"] == 1
            pp = _push_frames(g, seq=2, op="push_pull")  # same seq, other op: still a resend
            assert raw.rpc(pp).header["duplicate"]
            params = _pull(raw, 3)
        finally:
            raw.close()
        stats = server.stats()
    assert stats["pushes_applied"] == 1 and stats["duplicates"] == 2
    for k in PARAMS:
        np.testing.assert_allclose(params[k], PARAMS[k] - g[k], rtol=1e-6)


def test_sync_resend_while_round_open_is_counted_once():
    with serving(optimizer="sgd", optimizer_config={"lr": 1.0}, mode="sync",
                 num_workers=2) as server:
        raw = RawWorker(server.address)
        try:
            raw.rpc(_push_frames({}, 1, op="register"))
            frames = _push_frames(grads_for(0, 0), seq=2, op="push_pull")
            raw.sock.send_multipart(frames, copy=False)
            raw.sock.send_multipart(frames, copy=False)  # resent before the round closed
            with PSClient([server.address], 1) as c:
                c.register()
                _, params = c.wait(c.push_pull(grads_for(1, 0), 0))
            replies = [decode(recv_frames(raw.sock, 5.0), reply=True) for _ in range(2)]
        finally:
            raw.close()
    assert [r.header["ver"] for r in replies] == [1, 1]
    for k in PARAMS:
        mean = (grads_for(0, 0)[k] + grads_for(1, 0)[k]) / 2
        np.testing.assert_allclose(params[k], PARAMS[k] - mean, rtol=1e-5, atol=1e-6)


# ---- the client ---------------------------------------------------------------------------
def test_tickets_overlap_and_complete_out_of_order():
    with serving(optimizer="sgd", optimizer_config={"lr": 1.0}, mode="async") as server, \
            PSClient([server.address], 0) as c:
        c.register()
        t_push = c.push(grads_for(0, 0), 0)  # returns before the server has answered
        t_pull = c.pull()
        version, params = c.wait(t_pull)  # the push's reply is stashed on its ticket
        assert c.wait(t_push) == 1 and version == 1
        assert c.wait(c.pull(since_version=1)) == (1, {})  # not modified: no arrays
        out = {k: np.zeros_like(a) for k, a in PARAMS.items()}
        _, got = c.wait(c.pull(since_version=0, out=out))
        assert all(got[k] is out[k] for k in PARAMS)
        np.testing.assert_array_equal(out["w"], params["w"])
        assert c.bytes_received > sum(a.nbytes for a in PARAMS.values())


def test_client_errors():
    with PSClient(["tcp://127.0.0.1:1"], 0, timeout=0.2) as c:
        with pytest.raises(PSTimeoutError, match=r"no reply to register \(seq 1\) within 0.2 s "
                                                  r"from server\(s\) 0 \(tcp://127.0.0.1:1\)"):
            c.register()
        with pytest.raises(RuntimeError, match="register"):
            c.push({}, 0)
    with serving() as server, PSClient([server.address], 0) as c:
        c.register()
        with pytest.raises(KeyError, match="unknown"):
            c.push({"nope": np.zeros(1)}, 0)
        with pytest.raises(ValueError, match="shape"):
            c.push({"w": np.zeros(3)}, 0)


def test_optimizer_factory_and_schedule():
    class HalvingSGD:  # any object with lr and step() over (name, Parameter) pairs
        def __init__(self, params, lr):
            self.params, self.lr = params, lr

        def step(self):
            for _, p in self.params:
                p.data -= self.lr * p.grad

    g = grads_for(0, 0)
    sched = {"name": "step", "total_steps": 3, "step_size": 1, "gamma": 0.5}
    with serving(optimizer=HalvingSGD, optimizer_config={"lr": 1.0}, schedule=sched,
                 mode="async") as server, PSClient([server.address], 0) as c:
        c.register()
        for v in range(3):
            c.wait(c.push(g, v))  # lr 1, 0.5, 0.25
        _, params = c.wait(c.pull())
    np.testing.assert_allclose(params["w"], PARAMS["w"] - 1.75 * g["w"], rtol=1e-6)


def _serve_in_subprocess(queue):
    server = ParameterServer(PARAMS, optimizer="sgd", optimizer_config={"lr": 1.0},
                             mode="sync", num_workers=1)
    queue.put(server.address)
    server.run()


def test_server_in_a_subprocess_stops_on_shutdown():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_serve_in_subprocess, args=(queue,))
    proc.start()
    try:
        address = queue.get(timeout=60)
        with PSClient([address], 0, timeout=20) as c:
            c.register()
            v, params = c.wait(c.push_pull(grads_for(0, 0), 0))
            assert v == 1
            np.testing.assert_allclose(params["b"], -grads_for(0, 0)["b"])
            c.shutdown()
        proc.join(20)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()


_ROUNDS = """
import resource, sys, numpy as np
from distnet.ps.transport import keep_receive_buffers
if sys.argv[1] == "keep":
    assert keep_receive_buffers()
def one_round():  # the frames of one round of 8 shards of 2 MB, received then freed
    frames = [np.ones(1 << 19, np.float32) for _ in range(8)]
    del frames
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc allocator setting")
def test_server_processes_keep_message_buffers_instead_of_faulting_them_in_again():
    faults = {}
    for how in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", _ROUNDS, how], capture_output=True,
                              text=True, timeout=60, check=True)
        faults[how] = int(done.stdout)
    pages = 20 * 8 * (2 << 20) // 4096
    assert faults["default"] > pages // 2  # glibc gave the 16 MB back and mapped it again
    assert faults["keep"] < pages // 50
