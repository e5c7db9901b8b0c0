"""The same-host data plane (``distnet.ps.shm``): gradients and parameters in /dev/shm,
headers on ZeroMQ. Equal results to frames, zero-copy arrays, what refuses to attach,
torn reads, malformed shared-memory messages, slot reuse, and cleanup."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import time

import numpy as np
import pytest
import zmq
from test_ps_server import run_workers, serving

from distnet.ps import PSClient, PSError
from distnet.ps.protocol import decode, dense_entries, encode
from distnet.ps.shm import DIRECTORY, Segment, remove_stale

pytestmark = pytest.mark.skipif(not os.path.isdir(DIRECTORY), reason=f"no {DIRECTORY} here")

RNG = np.random.default_rng(5)
PARAMS = {"w": RNG.standard_normal((300, 78)).astype(np.float32),
          "b": np.zeros(78, np.float32), "v": RNG.standard_normal(5).astype(np.float32)}
KW = {"optimizer": "momentum", "optimizer_config": {"lr": 0.05, "momentum": 0.9},
      "mode": "sync", "num_workers": 2}


def grads(wid: int, t: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(10 * wid + t)
    return {k: rng.standard_normal(a.shape).astype(np.float32) for k, a in PARAMS.items()}


def train(shared: bool, steps: int = 4, zero_copy: bool = False) -> tuple[dict, list, dict]:
    """Two workers in threads, sync push_pulls; final parameters, clients' counters and the
    server's stats."""
    counters: list = [None, None]
    with serving(PARAMS, shared_memory=shared, **KW) as server:
        def worker(wid: int) -> None:
            with PSClient([server.address], wid, timeout=10, shared_memory=shared) as c:
                c.register()
                out = {k: np.empty_like(a) for k, a in PARAMS.items()}
                slots = None
                if zero_copy:
                    shared_arrays = c.shared_arrays()
                    assert shared_arrays is not None
                    out, slots = shared_arrays
                v, _ = c.wait(c.pull(out=out))
                for t in range(steps):
                    g = grads(wid, t)
                    if slots is not None:  # what backward does: write into the slot
                        for k, a in g.items():
                            slots[k][...] = a
                        g = slots
                    v, p = c.wait(c.push_pull(g, v, out=out))
                    assert v == t + 1 and all(p[k] is out[k] for k in p)
                held = {k: a.copy() for k, a in out.items()}
                counters[wid] = (c.bytes_sent, c.bytes_shared, held)
        run_workers(2, worker)
        stats = server.stats()
        final = {k: a.copy() for k, a in server.state.arrays.items()}
    return final, counters, stats


def test_shared_memory_gives_the_same_parameters_as_frames():
    by_frames, frame_counters, frame_stats = train(shared=False)
    by_shm, shm_counters, shm_stats = train(shared=True)
    zero_copy, _, zc_stats = train(shared=True, zero_copy=True)
    for k in PARAMS:
        np.testing.assert_array_equal(by_shm[k], by_frames[k])
        np.testing.assert_array_equal(zero_copy[k], by_frames[k])
        for counters in (shm_counters, frame_counters):
            np.testing.assert_array_equal(counters[1][2][k], by_frames[k])  # what workers hold
    nbytes = sum(a.nbytes for a in PARAMS.values())
    assert frame_stats["shm_gradients"] == 0 and frame_stats["shared_memory"] == ""
    assert shm_stats["shm_gradients"] == 8 and shm_stats["shm_replies"] == 10  # + 2 pulls
    assert zc_stats["shm_gradients"] == 8
    # only headers on the wire; the data went through the segment
    assert frame_counters[0][0] > 4 * nbytes > 10 * shm_counters[0][0]
    assert shm_counters[0][1] >= 8 * nbytes


def test_no_segment_when_async_or_turned_off():
    with serving(PARAMS, **{**KW, "mode": "async"}) as server:
        assert server.segment is None
        with PSClient([server.address], 0, timeout=5) as c:
            c.register()
            assert c.segments == [None] and c.shared_arrays() is None
    with serving(PARAMS, shared_memory=False, **KW) as server:
        assert server.segment is None
    with serving(PARAMS, **KW) as server, \
            PSClient([server.address], 0, timeout=5, codec="fp16") as c:
        c.register()  # a compressing client sends frames: the segment holds raw floats
        assert server.segment is not None and c.segments == [None]


def test_attach_refuses_what_is_not_this_hosts_segment():
    seg = Segment.create(PARAMS, 2)
    assert seg is not None
    try:
        keys = list(PARAMS)
        shapes = [a.shape for a in PARAMS.values()]
        dtypes = [a.dtype for a in PARAMS.values()]
        good = seg.info()
        other = Segment.attach(good, keys, shapes, dtypes)
        assert other is not None
        np.testing.assert_array_equal(other.params()["w"], PARAMS["w"])
        other.close()
        assert os.path.exists(seg.path)  # only the owner removes the file
        for bad in ({**good, "nonce": bytes(16)},                    # another host's file
                    {**good, "name": "distnet-1-000000000000"},      # no such file
                    {**good, "name": "../../etc/passwd"},            # not a segment name
                    {**good, "size": good["size"] + 4096},           # another layout
                    {**good, "slots": "2"}, "not a map"):
            assert Segment.attach(bad, keys, shapes, dtypes) is None, bad
        assert Segment.attach(good, keys, [(1,), *shapes[1:]], dtypes) is None
    finally:
        seg.close()
    assert not os.path.exists(seg.path)


def test_a_torn_copy_is_refused():
    """The server changing its parameters while a worker copies them out: the seqlock
    counter in the reply no longer matches and the copy is refused, not used."""
    with serving(PARAMS, **KW) as server, PSClient([server.address], 0, timeout=5) as c:
        c.register()
        ticket = c.pull(out={k: np.empty_like(a) for k, a in PARAMS.items()})
        deadline = time.monotonic() + 5
        while server.stats()["shm_replies"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with server.segment.writing():  # an update under way when the worker copies
            with pytest.raises(PSError, match="updated its parameters while this worker"):
                c.wait(ticket)


def test_a_torn_push_pull_frees_the_slot():
    """A push_pull whose parameters changed under the copy is refused; its reply came, so
    the slot is free again and the next push goes through it, not as frames."""
    with serving(PARAMS, **{**KW, "num_workers": 1}) as server, \
            PSClient([server.address], 0, timeout=5) as c:
        c.register()
        ticket = c.push_pull(grads(0, 0), 0, out={k: np.empty_like(a) for k, a in PARAMS.items()})
        deadline = time.monotonic() + 5
        while server.stats()["shm_replies"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        with server.segment.writing():  # another update after the reply, before the copy
            pass
        with pytest.raises(PSError, match="updated its parameters while this worker"):
            c.wait(ticket)
        before = c.bytes_sent
        c.wait(c.push_pull(grads(0, 1), 1))
        assert c.bytes_sent - before < 4096  # a header: the gradient went through the slot


def _request(server, header: dict, entries=(), codec: str = "none") -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(server.address)
    try:
        sock.send_multipart(encode({"wid": 0, "seq": 1, "ver": 0, **header}, entries, codec,
                                   shared=True))
        assert sock.poll(5000), "no reply"
        return decode(sock.recv_multipart(), reply=True).header
    finally:
        sock.close(linger=0)


def test_malformed_shared_memory_requests_are_refused():
    with serving(PARAMS, **KW) as server:
        seg = server.segment
        entries = dense_entries(seg.slot(0))
        name = seg.name
        cases = [({"op": "pull", "seg": name}, [], "carries no arrays in shared memory"),
                 ({"op": "push", "seg": name, "wid": 7}, entries, "has no shared-memory slot"),
                 ({"op": "push", "seg": name, "keys": list(seg.keys)[::-1]}, entries,
                  r"lists no \['keys'\]: the segment's layout"),
                 ({"op": "push", "seg": "distnet-1-000000000000"}, entries,
                  "not this server's .* register again")]
        for header, ents, text in cases:
            reply = _request(server, header, ents)
            assert reply["status"] == "error", header
            assert re.search(text, reply["message"]), reply["message"]
        assert _request(server, cases[-1][0], entries)["code"] == "unregistered"
        reply = _request(server, {"op": "push", "seg": name}, entries, codec="int8")
        assert "codec must be 'none', got 'int8'" in reply["message"]
        assert server.stats()["pushes_applied"] == 0 and server.state.version == 0
    with serving(PARAMS, shared_memory=False, **KW) as server:
        reply = _request(server, {"op": "push"}, entries)
        assert "no shared-memory segment" in reply["message"]


def test_a_busy_slot_sends_frames():
    """A second push while the first still uses the slot goes as frames, so the slot is
    never rewritten under a request in flight. The frames go by ZeroMQ, the first push's
    header by the same-host channel: the second waits for the first's answer, so the
    server still sees them in order and refuses the second."""
    with serving(PARAMS, **KW) as server, PSClient([server.address], 0, timeout=5) as c:
        c.register()
        first = c.push(grads(0, 0), 0)
        before = c.bytes_sent
        second = c.push(grads(0, 1), 0)
        assert len(second.frames[0]) == 1 + len(PARAMS)
        assert c.bytes_sent == before  # held back until the first is answered
        c.wait(first)
        with pytest.raises(PSError, match="already pushed"):
            c.wait(second)
        assert c.bytes_sent - before > sum(a.nbytes for a in PARAMS.values())
        before = c.bytes_sent
        c.push(grads(0, 2), 0)  # the slot is free again: only a header
        assert c.bytes_sent - before < 4096


@pytest.mark.parametrize("nonfinite", ["reject", "clip"])
def test_a_nonfinite_gradient_in_a_slot_is_caught(nonfinite):
    """The slot is read in place (no copy on the way in), and still checked: a NaN is
    refused, leaving the round and the parameters as they were, or zeroed ("clip")."""
    kw = {**KW, "num_workers": 1, "nonfinite": nonfinite}
    with serving(PARAMS, **kw) as server, PSClient([server.address], 0, timeout=5) as c:
        c.register()
        bad = grads(0, 0)
        bad["w"][3, 4] = np.nan
        if nonfinite == "reject":
            with pytest.raises(PSError, match="NaN or inf"):
                c.wait(c.push_pull(bad, 0))
            for k, a in PARAMS.items():
                np.testing.assert_array_equal(server.state.arrays[k], a)
            version, _ = c.wait(c.push_pull(grads(0, 1), 0))  # the round is still open
        else:
            version, params = c.wait(c.push_pull(bad, 0))
            assert np.isfinite(params["w"]).all() and params["w"][3, 4] == PARAMS["w"][3, 4]
        stats = server.stats()
        assert version == 1 and stats["shm_gradients"] == 2 - (nonfinite == "clip")
        assert stats["nonfinite"] == 1


def _exit_now() -> None:
    pass


def test_segments_are_removed_on_close_and_after_a_crash():
    with serving(PARAMS, **KW) as server:
        path = server.segment.path
        assert os.path.exists(path) and os.stat(path).st_mode & 0o777 == 0o600
    assert not os.path.exists(path)
    proc = mp.get_context("spawn").Process(target=_exit_now)
    proc.start()
    proc.join(30)
    stale = os.path.join(DIRECTORY, f"distnet-{proc.pid}-0123456789ab")
    with open(stale, "wb") as f:
        f.write(b"x")
    assert remove_stale() >= 1 and not os.path.exists(stale)


def test_a_round_answers_its_last_worker_first():
    """The worker whose gradient completed the round is the straggler (on one host: the
    one across TCP); its reply goes out first, since the next round waits for it."""
    with serving(PARAMS, **KW) as server, \
            PSClient([server.address], 0, timeout=5) as c0, \
            PSClient([server.address], 1, timeout=5) as c1:
        for c in (c0, c1):
            c.register()
        sent: list[int] = []
        send = server._send

        def recording(identity, header, *args, **kwargs):
            if header["op"] == "push_pull":
                sent.append(header["wid"])
            return send(identity, header, *args, **kwargs)

        server._send = recording
        first = c0.push_pull(grads(0, 0), 0)
        deadline = time.monotonic() + 5
        while server.stats()["gradients_received"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = c1.push_pull(grads(1, 0), 0)
        assert c0.wait(first)[0] == c1.wait(second)[0] == 1
        assert sent == [1, 0]


def test_arrays_outlive_a_closed_segment():
    """Closing a segment (a client re-attaching, a server stopping) must not unmap memory
    that arrays still view: reading them afterwards is valid, not a crash."""
    seg = Segment.create(PARAMS, 1)
    assert seg is not None
    params, slot = seg.params(), seg.slot(0)
    seg.close()
    assert not os.path.exists(seg.path)
    np.testing.assert_array_equal(params["w"], PARAMS["w"])
    slot["v"][...] = 1.0
    assert float(slot["v"].sum()) == 5.0


def round_of(held_early: bool, checkpointed: bool) -> dict[str, np.ndarray]:
    """One sync round of two slot gradients on a ServerState; worker 0 is answered early
    (held_early) and then writes garbage into its slot, as it is then free to."""
    from distnet.ps.state import ServerState

    st = ServerState(PARAMS, optimizer="momentum",
                     optimizer_config={"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3})
    for t in range(2):
        slots = [{k: a.copy() for k, a in grads(w, t).items()} for w in (0, 1)]
        st.accumulate(slots[0], True, 0, slot=True)
        if held_early:
            st.answering(0)
            for a in slots[0].values():
                a[...] = np.nan
        if checkpointed:
            total = st.round_sum()
            np.testing.assert_array_equal(total["w"], grads(0, t)["w"])
        st.accumulate(slots[1], True, 1, slot=True)
        assert st.accumulated == 2
        st.apply_accumulated()
        assert st.accumulated == 0 and st.round_sum() is None
    return {k: a.copy() for k, a in st.arrays.items()}


def test_a_held_slot_answered_early_is_copied_first_and_the_step_is_unchanged():
    plain = round_of(held_early=False, checkpointed=False)
    assert all(np.isfinite(a).all() for a in plain.values())
    for early, ckpt in ((True, False), (False, True), (True, True)):
        got = round_of(held_early=early, checkpointed=ckpt)
        for k in PARAMS:  # bit for bit: the copy stays a gradient of its own
            np.testing.assert_array_equal(got[k], plain[k])


def test_the_server_prepares_the_step_when_the_first_gradient_of_a_round_arrives():
    """Worker 0 pushes first: the server takes its gradient into the next momentum
    buffer at once (prepare_round), so the round's step reads only worker 1's. Shown by
    what the step uses when worker 0's gradient is changed after it was taken (a real
    worker cannot: its slot stays the server's until the round is answered)."""
    with serving(PARAMS, **KW) as server:
        st = server.state
        with PSClient([server.address], 0, timeout=10) as c0, \
                PSClient([server.address], 1, timeout=10) as c1:
            c0.register()
            c1.register()
            g0, g1 = grads(0, 0), grads(1, 0)
            first = c0.push_pull(g0, 0)
            wait_for_round = time.monotonic() + 5
            while st.optimizer._prepared is None:  # set once prepare_round has run
                assert time.monotonic() < wait_for_round, "the server never prepared the step"
                time.sleep(0.005)
            assert st.accumulated == 1 and len(st.optimizer._prepared[2]) == 1
            for a in st._held[0].values():  # taken already: this must not reach the step
                a[...] = np.nan
            c1.wait(c1.push_pull(g1, 0))
            c0.wait(first)
        assert all(np.isfinite(a).all() for a in st.arrays.values())
