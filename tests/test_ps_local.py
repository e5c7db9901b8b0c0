"""The same-host channel (``distnet.ps.local``): headers of workers attached to a server's
shared-memory segment bypass ZeroMQ. Same results, who may connect, what falls back to
ZeroMQ (replies with arrays, a broken channel), and bad messages on it."""

from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest
from test_ps_server import run_workers, serving
from test_ps_shm import KW, PARAMS, grads, train

from distnet.ps import PSClient, local
from distnet.ps.protocol import decode, dense_entries, encode

pytestmark = pytest.mark.skipif(not local.AVAILABLE or not os.path.isdir("/dev/shm"),
                                reason="the same-host channel needs Linux and /dev/shm")


def wait_for(predicate, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_shared_memory_headers_take_the_channel(monkeypatch):
    by_channel, _, stats = train(shared=True)
    assert stats["local_requests"] == 10  # 8 push_pulls + 2 first pulls: none by ZeroMQ
    monkeypatch.setenv("DISTNET_LOCAL_CHANNEL", "0")
    by_zmq, _, zmq_stats = train(shared=True)
    assert zmq_stats["local_requests"] == 0 and zmq_stats["shm_gradients"] == 8
    for k in PARAMS:
        np.testing.assert_array_equal(by_channel[k], by_zmq[k])


def test_only_segment_workers_get_a_channel():
    with serving(PARAMS, **{**KW, "mode": "async"}) as server:
        assert server.local is None  # no segment, no channel
    with serving(PARAMS, **KW) as server:
        with PSClient([server.address], 0, timeout=5, codec="fp16") as c:
            c.register()  # frames of compressed arrays: ZeroMQ
            assert c._links.local == [None]
        with PSClient([server.address], 1, timeout=5) as c:
            c.register()
            assert c._links.local[0] is not None
            wait_for(lambda: server.stats()["local_channels"] == 1, "the channel")


def test_another_users_process_is_refused(monkeypatch):
    """Both ends check the other's user (SO_PEERCRED). Here one process plays both, so
    a faked uid makes each side see a stranger."""
    with serving(PARAMS, **{**KW, "num_workers": 1}) as server:
        real = os.getuid()
        monkeypatch.setattr(local.os, "getuid", lambda: real + 1)
        # the worker's side: a listener of another user is not talked to
        with PSClient([server.address], 0, timeout=5) as c:
            c.register()
            assert c._links.local == [None] and c.segments[0] is not None
            c.wait(c.push_pull(grads(0, 0), 0))  # by ZeroMQ, still through the slot
        wait_for(lambda: server.stats()["local_refused"] == 1, "the server to refuse it too")
        # the server's side: a connection from another user is closed at once
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(5)
        sock.connect(local.address(server.segment.name))
        assert sock.recv(100) == b""
        sock.close()
        stats = server.stats()
        assert stats["local_refused"] == 2 and stats["local_requests"] == 0
        assert stats["version"] == 1


def test_a_reply_with_arrays_goes_by_zeromq():
    """Parameters that left shared memory (a slow reader elsewhere) come back as frames,
    which the channel does not carry: they go to where the worker registered from."""
    with serving(PARAMS, **{**KW, "num_workers": 1}) as server, \
            PSClient([server.address], 0, timeout=5) as c:
        c.register()
        out = {k: np.empty_like(a) for k, a in PARAMS.items()}
        v, _ = c.wait(c.pull(out=out))
        v, _ = c.wait(c.push_pull(grads(0, 0), v, out=out))
        server.state.detach()  # what _wait_inflight does for a slow reader (no request is open)
        server._params_entries = dense_entries(server.state.arrays)
        before = c.bytes_received
        v, _ = c.wait(c.push_pull(grads(0, 1), v, out=out))
        assert v == 2 and c.bytes_received - before >= sum(a.nbytes for a in PARAMS.values())
        for k, a in server.state.arrays.items():
            np.testing.assert_array_equal(out[k], a)
        assert server.stats()["local_requests"] == 3


def test_a_broken_channel_falls_back_to_zeromq():
    with serving(PARAMS, **{**KW, "num_workers": 1}) as server, \
            PSClient([server.address], 0, timeout=5) as c:
        c.register()
        out = {k: np.empty_like(a) for k, a in PARAMS.items()}
        v, _ = c.wait(c.push_pull(grads(0, 0), 0, out=out))
        wait_for(lambda: server.stats()["local_channels"] == 1, "the channel")
        server.local_peers[0].sock.shutdown(socket.SHUT_RDWR)  # the server's end breaks
        wait_for(lambda: server.stats()["local_channels"] == 0, "the server to drop it")
        for t in (1, 2):
            v, _ = c.wait(c.push_pull(grads(0, t), v, out=out))
        assert v == 3 and c._links.local == [None]
        assert server.stats()["local_requests"] == 1
        for k, a in server.state.arrays.items():
            np.testing.assert_array_equal(out[k], a)


def test_bad_messages_on_the_channel():
    with serving(PARAMS, **KW) as server:
        peer = local.connect(server.segment.name)
        assert peer is not None

        def ask(raw: bytes) -> bytes | None:
            assert peer.send([raw])
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                got = peer.receive()
                if got is None or got:
                    return got[0] if got else None
                time.sleep(0.01)
            raise AssertionError("no reply")

        reply = decode([ask(b"\xc1 not msgpack")], reply=True).header
        assert reply["status"] == "error" and "not valid msgpack" in reply["message"]
        header = {"op": "push", "wid": 0, "seq": 1, "ver": 0, "seg": server.segment.name,
                  "shapes": [[1]]}
        reply = decode([ask(encode(header, shared=True)[0])], reply=True).header
        assert "lists no ['shapes']" in reply["message"]
        # longer than any header: the server closes the channel and serves on
        peer.sock.send(b"x" * (local.MAX_MESSAGE + 1))
        assert ask(b"") is None
        assert server.state.version == 0 and server.stats()["rejected"] == 2

        def worker(wid: int) -> None:
            with PSClient([server.address], wid, timeout=5) as c:
                c.register()
                c.wait(c.push_pull(grads(wid, 0), 0))
        run_workers(2, worker)
        assert server.state.version == 1


def test_receive_takes_every_queued_message_then_sees_the_close():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    b.setblocking(False)
    peer = local.LocalPeer(b)
    assert peer.receive() == []  # nothing yet: no error, not closed
    for m in (b"one", b"two", b"x" * 1000):
        a.send(m)
    assert peer.receive() == [b"one", b"two", b"x" * 1000]
    a.send(b"last")
    a.close()
    assert peer.receive() == [b"last"]  # what came before the close is kept
    assert peer.receive() is None and peer.closed
