"""Faults the parameter server survives: a SIGKILLed server resumed from its checkpoint on
the same address, SIGTERM, dead and returning workers, and checkpoints themselves.

Servers that get killed run in subprocesses (spawn); workers are threads with their
own PSClient, except the one that gets killed, which is a subprocess. Every
process is killed in a finally.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import numpy as np
import pytest
from test_ps_server import PARAMS, grads_for, run_workers, serving

from distnet.checkpoint import CheckpointError
from distnet.ps import ParameterServer, PSClient, PSError, PSTimeoutError
from distnet.ps import checkpoint as ckpt

SPAWN = mp.get_context("spawn")
FAST = {"heartbeat_interval": 0.2, "retry_interval": 1.0}  # client settings for short tests


def _serve(queue, bind, directory, resume, mode, num_workers, every):
    server = ParameterServer(PARAMS, optimizer="momentum", optimizer_config={"lr": 0.01},
                             mode=mode, num_workers=num_workers, bind=bind, timeout=30.0,
                             checkpoint_dir=directory, checkpoint_every=every, resume=resume)
    queue.put(server.address)
    server.run()


def start_server(bind="tcp://127.0.0.1:0", directory=None, resume=None, mode="async",
                 num_workers=2, every=0):
    queue = SPAWN.Queue()
    proc = SPAWN.Process(target=_serve, args=(queue, bind, directory, resume, mode,
                                              num_workers, every))
    proc.start()
    try:
        return proc, queue.get(timeout=60)
    except BaseException:
        proc.kill()
        raise


def _kill(*procs):
    for p in procs:
        if p is not None and p.is_alive():
            p.kill()
        if p is not None:
            p.join(10)


# ---- the server dies --------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_sigkilled_server_resumes_on_the_same_address_and_the_job_finishes(tmp_path, mode):
    n, steps, every = 2, 40, 5
    done = [0] * n
    first = second = None
    try:
        first, address = start_server(directory=tmp_path, mode=mode, every=every)

        def worker(wid):
            with PSClient([address], wid, timeout=60, **FAST) as c:
                c.register()
                v, _ = c.wait(c.pull())
                for t in range(steps):
                    if mode == "sync":
                        v, _ = c.wait(c.push_pull(grads_for(wid, t), v))
                    else:
                        v = c.wait(c.push(grads_for(wid, t), v))
                    done[wid] = t + 1
                    time.sleep(0.01)  # a long enough run to be killed in the middle of

        threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(n)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum(done) < n * steps // 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        first.kill()  # SIGKILL: no stop checkpoint, no goodbye
        first.join(10)
        killed_at = sum(done)
        assert 0 < killed_at < n * steps and ckpt.list_checkpoints(tmp_path, 0)
        second, again = start_server(bind=address, resume=tmp_path, mode=mode, every=every)
        assert again == address
        for t in threads:
            t.join(60)
        assert done == [steps] * n  # every worker finished, reconnecting by itself
        with PSClient([address], 0, timeout=20) as c:
            stats = c.stats()[0]
    finally:
        _kill(first, second)
    total = steps if mode == "sync" else n * steps
    resumed = stats["resumed_from"]["version"]
    assert resumed % every == 0 and resumed > 0
    assert total - every <= stats["version"] <= total  # at most one interval of updates lost
    print(f"\n{mode}: SIGKILL after {killed_at} of {n * steps} pushes, resumed at version "
          f"{resumed}, finished at {stats['version']} of {total} "
          f"(lost {total - stats['version']} <= {every})")


def test_sigterm_writes_a_checkpoint_that_resumes_exactly(tmp_path):
    first = second = None
    try:
        first, address = start_server(directory=tmp_path)
        with PSClient([address], 0, timeout=20, **FAST) as c:
            c.register()
            for t in range(7):
                last = c.push(grads_for(0, t), t)
                assert c.wait(last) == t + 1
            _, before = c.wait(c.pull())
            before = {k: a.copy() for k, a in before.items()}
            first.terminate()  # SIGTERM
            first.join(20)
            assert first.exitcode == 0
            assert [v for v, _ in ckpt.list_checkpoints(tmp_path, 0)] == [7]
            second, _ = start_server(bind=address, resume=tmp_path)
            last.replies.clear()  # as if its reply had been lost in the crash
            c.resend(last)  # its seq is in the checkpoint: a duplicate, not applied again
            version, after = c.wait(c.pull())
            stats = c.stats()[0]
    finally:
        _kill(first, second)
    assert version == 7 and stats["duplicates"] == 1 and stats["pushes_applied"] == 7
    for k in PARAMS:
        np.testing.assert_array_equal(after[k], before[k])


def test_a_server_that_stays_dead_is_named_after_the_deadline():
    proc = None
    try:
        proc, address = start_server()
        with PSClient([address], 0, timeout=1.5, **FAST) as c:
            c.register()
            _kill(proc)
            t0 = time.monotonic()
            with pytest.raises(PSTimeoutError, match=rf"no reply to push \(seq \d+\) within 1.5 s "
                                                     rf"from server\(s\) 0 \({address}\) "
                                                     r"\[server 0: connection lost"):
                c.wait(c.push(grads_for(0, 0), 0))
            assert time.monotonic() - t0 < 3
    finally:
        _kill(proc)


# ---- a worker dies ----------------------------------------------------------------------
def _doomed_worker(address, wid):
    with PSClient([address], wid, timeout=60, heartbeat_interval=0.2) as c:
        c.register()
        v, _ = c.wait(c.pull())
        for t in range(10**6):  # until SIGKILL
            v, _ = c.wait(c.push_pull(grads_for(wid, t), v))
            time.sleep(0.01)


def _two_survivors(server, steps, outcome):
    doomed = SPAWN.Process(target=_doomed_worker, args=(server.address, 2))
    doomed.start()
    try:
        def worker(wid):
            with PSClient([server.address], wid, timeout=30, **FAST) as c:
                c.register()
                v, _ = c.wait(c.pull())
                try:
                    for t in range(steps):
                        v, _ = c.wait(c.push_pull(grads_for(wid, t), v))
                        time.sleep(0.01)
                        if v == 5 and doomed.is_alive():
                            doomed.kill()  # mid-run, in the middle of the next round
                except PSError as exc:
                    outcome[wid] = exc
                    return
                outcome[wid] = v

        run_workers(2, worker)
    finally:
        _kill(doomed)


def test_a_killed_worker_is_dropped_and_the_others_finish():
    outcome: dict = {}
    with serving(mode="sync", num_workers=3, worker_timeout=1.0, timeout=20) as server:
        _two_survivors(server, 20, outcome)
        stats = server.stats()
    assert outcome == {0: 20, 1: 20}  # 20 rounds: the last 15 without worker 2
    assert stats["lost_workers"] == stats["lost_shards"] == [2] and stats["live"] == [0, 1]
    assert stats["workers_lost"] == 1 and "no message or heartbeat" in stats["lost"]["2"][
        "reason"]


def test_on_worker_loss_abort_stops_the_job_naming_the_worker():
    outcome: dict = {}
    with serving(mode="sync", num_workers=3, worker_timeout=1.0, timeout=20,
                 on_worker_loss="abort") as server:
        _two_survivors(server, 20, outcome)
        server._thread.join(5)  # the loop ends by itself, worker_timeout after the abort
        assert not server._thread.is_alive()
        stats = server.stats()
    for wid in (0, 1):
        assert isinstance(outcome[wid], PSError), outcome
        assert "job aborted: worker 2 lost" in str(outcome[wid])
        assert set(outcome[wid].codes.values()) == {"aborted"}
    assert stats["aborted"].startswith("job aborted: worker 2 lost")


def test_async_waits_for_nobody_and_a_lost_worker_can_come_back():
    with serving(mode="sync", num_workers=2, worker_timeout=0.5, timeout=20) as server:
        w0_alone, w1_back = threading.Event(), threading.Event()
        versions: dict[int, list[int]] = {0: [], 1: []}

        def worker(wid):
            with PSClient([server.address], wid, timeout=20, **FAST) as c:
                c.register()
                v, _ = c.wait(c.pull())
                for t in range(9 if wid == 0 else 3):
                    if wid == 0 and t == 6:  # phase 2 (alone) done; phase 3: together again
                        w0_alone.set()
                        w1_back.wait(20)
                    v, _ = c.wait(c.push_pull(grads_for(wid, t), v))
                    versions[wid].append(v)
            if wid == 1:  # closed: its heartbeats stop, the server gives it up
                while server.stats()["lost_workers"] != [1]:
                    time.sleep(0.05)
                w0_alone.wait(20)
                with PSClient([server.address], 1, timeout=20, **FAST) as c:
                    c.register()  # comes back: a new session of worker 1
                    v, _ = c.wait(c.pull())
                    w1_back.set()
                    for t in range(3):
                        v, _ = c.wait(c.push_pull(grads_for(1, 10 + t), v))
                        versions[1].append(v)

        run_workers(2, worker)
        stats = server.stats()
    assert versions[0] == list(range(1, 10)) and versions[1] == [1, 2, 3, 7, 8, 9]
    assert stats["workers_lost"] == 1 and stats["rejoins"] == 1 and stats["lost_workers"] == []

    with serving(mode="async", num_workers=2, worker_timeout=0.6) as server:
        with PSClient([server.address], 1, heartbeat_interval=None) as silent:
            silent.register()  # then says nothing: nobody waits for it in async mode
        with PSClient([server.address], 0, heartbeat_interval=0.1) as c:
            c.register()
            t0 = time.monotonic()
            for t in range(20):
                c.wait(c.push(grads_for(0, t), t))
            assert time.monotonic() - t0 < 2
            time.sleep(0.9)
            assert c.stats()[0]["lost_workers"] == [1]


# ---- checkpoints --------------------------------------------------------------------------
def test_checkpoint_holds_an_open_sync_round_and_survives_damage(tmp_path):
    kw = {"optimizer": "momentum", "optimizer_config": {"lr": 0.1}, "mode": "sync",
          "num_workers": 2, "checkpoint_dir": tmp_path, "timeout": 10.0}
    with serving(**kw) as server:
        train = [PSClient([server.address], w, **FAST) for w in (0, 1)]
        for c in train:
            c.register()
        for t in range(2):
            tickets = [c.push_pull(grads_for(w, t), t) for w, c in enumerate(train)]
            for c, tk in zip(train, tickets, strict=True):
                c.wait(tk)
        open_round = train[0].push_pull(grads_for(0, 2), 2)  # worker 1 has not pushed yet
        time.sleep(0.2)
    for c in train:
        c.close()
    assert [v for v, _ in ckpt.list_checkpoints(tmp_path, 0)] == [2]  # written on stop
    with serving(**kw, resume=tmp_path) as server:
        assert server.stats()["resumed_from"]["version"] == 2
        workers = [PSClient([server.address], w, **FAST) for w in (0, 1)]
        try:
            workers[0].register()
            workers[1].register()
            t1 = workers[1].push_pull(grads_for(1, 2), 2)  # completes the restored round
            v, params = workers[1].wait(t1)
        finally:
            for c in workers:
                c.close()
        stats = server.stats()
    assert v == 3 and stats["pushes_applied"] == 6 and open_round.seq > 0
    with serving(optimizer="momentum", optimizer_config={"lr": 0.1}, mode="sync",
                 num_workers=2) as ref:
        from test_ps_server import train_sync
        expected = train_sync([ref.address], 2, 3)[0]
    for k in PARAMS:
        np.testing.assert_allclose(params[k], expected[k], rtol=1e-6, atol=1e-7)
    newest = ckpt.checkpoint_path(tmp_path, 0, 99)
    newest.write_bytes(b"PK\x03\x04 damaged by a crash")
    assert ckpt.latest_checkpoint(tmp_path, 0).name == "ps-0-v000000000003.npz"
    with pytest.raises(CheckpointError, match="checksum|truncated|damaged"):
        ckpt.load(newest)
    with pytest.raises(CheckpointError, match="keys is .* not this shard"):
        ParameterServer({"w": np.zeros(3, np.float32)}, resume=tmp_path, mode="sync",
                        num_workers=2)
    with pytest.raises(FileNotFoundError, match="no readable checkpoint of shard 5"):
        ParameterServer(PARAMS, resume=tmp_path, server_id=5)
