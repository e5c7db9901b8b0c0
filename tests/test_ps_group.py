"""Several shards served by one loop (``distnet.ps.group``), and the client's handling of
their replies: equality with one server, stopping, inproc, early copies into ``out``."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_ps_server import run_workers, serving

from distnet.ps import ParameterServer, PSClient, PSError
from distnet.ps.group import PART_BYTES, ServerGroup, parts_for, shard_binds, shard_group

RNG = np.random.default_rng(3)
# "emb" is 640 KB: large enough for plan_shards to cut it between rows
BIG = {"emb": RNG.standard_normal((20000, 8)).astype(np.float32),
       "w": RNG.standard_normal((8, 4)).astype(np.float32),
       "b": np.zeros(4, np.float32)}
KW = {"optimizer": "adam", "optimizer_config": {"lr": 0.01}, "mode": "sync", "timeout": 10.0}


def grads(wid: int, t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 * wid + t)
    return {k: rng.standard_normal(a.shape).astype(np.float32) for k, a in BIG.items()}


def train(addresses: list[str], n: int, steps: int, out: bool) -> dict[int, dict]:
    """n workers in threads, ``steps`` sync push_pulls each; their final parameters."""
    results = {}

    def worker(wid):
        with PSClient(addresses, wid, timeout=20) as c:
            c.register()
            dest = {k: np.empty_like(a) for k, a in BIG.items()} if out else None
            v, p = c.wait(c.pull(out=dest))
            for t in range(steps):
                v, p = c.wait(c.push_pull(grads(wid, t), v, out=dest))
                assert v == t + 1
                if out:
                    assert all(p[k] is dest[k] for k in BIG)  # delivered into out, in order
            assert list(p) == list(BIG)
            results[wid] = {k: a.copy() for k, a in p.items()}

    run_workers(n, worker)
    return results


@pytest.mark.parametrize("out", [False, True])
def test_a_group_of_shards_equals_one_server(out):
    with serving(BIG, num_workers=2, **KW) as one:
        single = train([one.address], 2, 3, out)
    group = shard_group(BIG, 4, num_workers=2, **KW)
    assert len(group.servers) == 4
    assert [s.server_id for s in group.servers] == [0, 1, 2, 3]
    assert sum(s.state.nbytes() for s in group.servers) == sum(a.nbytes for a in BIG.values())
    group.start_thread()
    try:
        sharded = train(group.addresses, 2, 3, out)
        stats = group.stats()
    finally:
        group.stop()
    assert [s["version"] for s in stats] == [3, 3, 3, 3]
    for k in BIG:
        np.testing.assert_allclose(sharded[0][k], single[0][k], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(sharded[0][k], sharded[1][k])


def test_a_group_ends_when_every_shard_is_shut_down():
    group = shard_group(BIG, 3, num_workers=1, **KW)
    thread = group.start_thread()
    with PSClient(group.addresses, 0, timeout=10) as c:
        c.register()
        c.shutdown()
    thread.join(5)
    assert not thread.is_alive()
    assert all(s._stop.is_set() for s in group.servers)


def test_an_error_on_one_shard_leaves_the_others_copied_into_out():
    """A NaN in the piece one shard holds: that shard refuses and changes nothing, the
    others apply their pieces, and ``out`` holds what every server now holds."""
    group = shard_group(BIG, 3, num_workers=1, **KW)
    group.start_thread()
    try:
        with PSClient(group.addresses, 0, timeout=10) as c:
            layout = c.register()
            out = {k: np.zeros_like(a) for k, a in BIG.items()}
            v, _ = c.wait(c.pull(out=out))
            bad = grads(0, 0)
            last = layout.plan.pieces[-1]  # the piece of the last shard
            bad[last.name][last.start if last.split else 0] = np.nan
            with pytest.raises(PSError, match="NaN"):
                c.wait(c.push_pull(bad, v, out=out))
            stats = c.stats()
            held = c.wait(c.pull())[1]
    finally:
        group.stop()
    assert [s["version"] for s in stats] == [1, 1, 0]
    for k in BIG:
        np.testing.assert_array_equal(out[k], held[k])


def test_a_colocated_worker_reaches_its_shards_over_inproc():
    group = shard_group(BIG, 2, num_workers=1, **KW)
    local = group.bind_local()
    assert all(a.startswith("inproc://") for a in local)
    group.start_thread()
    try:
        results = train(local, 1, 2, out=True)
    finally:
        group.stop()
    assert results[0]["emb"].shape == BIG["emb"].shape


def test_a_secured_server_has_no_inproc_endpoint(tmp_path):
    from distnet.cli import main as cli

    assert cli.main(["keygen", "--dir", str(tmp_path), "--clients", "1"]) == 0
    server = ParameterServer(BIG, security=tmp_path)
    try:
        assert server.bind_local() is None
    finally:
        server.stop()


def test_parts_and_binds():
    assert parts_for(16_000_000) == 8
    assert parts_for(1_066_440) == 1  # lenet300: one shard (extra messages only cost)
    assert parts_for(100 * PART_BYTES) == 16
    assert parts_for(10, 3) == 3 and parts_for(10, "2") == 2
    with pytest.raises(ValueError, match="shards per server must be >= 1"):
        parts_for(10, 0)
    assert shard_binds("tcp://127.0.0.1:0", 3) == ["tcp://127.0.0.1:0"] * 3
    assert shard_binds("tcp://*:5555", 3) == ["tcp://*:5555", "tcp://*:5556", "tcp://*:5557"]
    assert shard_binds("ipc:///tmp/ps", 1) == ["ipc:///tmp/ps"]
    with pytest.raises(ValueError, match="need a tcp://HOST:PORT"):
        shard_binds("ipc:///tmp/ps", 2)
    with pytest.raises(ValueError, match=r"shards 2..4 are not all in 0..3"):
        shard_group(BIG, 3, first_id=2, num_shards=4)
    with pytest.raises(ValueError, match="at least one shard"):
        ServerGroup([])


def test_stop_from_another_thread_ends_the_loop():
    group = shard_group(BIG, 2, num_workers=1, **KW)
    thread = group.start_thread()
    threading.Timer(0.1, group.stop).start()
    thread.join(5)
    assert not thread.is_alive()
