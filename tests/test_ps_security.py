"""Who gets in: CURVE keys, the ZAP handler, and where a server may listen without keys.

Servers run in a thread on 127.0.0.1 with security on (explicitly: loopback would be
allowed without it). A client without keys, or with a key the server does not
list, gets nothing back at all: not a reply, not an error, not a byte of the
parameters; the one with the right key works.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq
from test_ps_server import PARAMS, grads_for

from distnet.cli import main as cli
from distnet.cli.keygen import client_names
from distnet.ps import ClientKeys, ParameterServer, PSClient, PSTimeoutError, SecurityError
from distnet.ps.auth import ServerKeys, is_local_address
from distnet.ps.transport import make_socket


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    assert cli.main(["keygen", "--dir", str(root / "cluster"), "--clients", "2"]) == 0
    assert cli.main(["keygen", "--dir", str(root / "other"), "--clients", "1"]) == 0
    return root


@contextmanager
def secure_server(keys_dir: Path, bind: str = "tcp://127.0.0.1:0", **kw):
    server = ParameterServer(PARAMS, optimizer="sgd", optimizer_config={"lr": 1.0},
                             mode="async", num_workers=2, bind=bind, security=keys_dir,
                             timeout=5.0, **kw)
    server.start_thread()
    try:
        yield server
    finally:
        server.stop()


def test_the_right_key_gets_in(keys):
    with secure_server(keys / "cluster") as server, \
            PSClient([server.address], 1, security=keys / "cluster", timeout=10) as c:
        c.register()
        assert c.wait(c.push(grads_for(1, 0), 0)) == 1
        _, params = c.wait(c.pull())
        np.testing.assert_allclose(params["b"], PARAMS["b"] - grads_for(1, 0)["b"], rtol=1e-6)
        stats = c.stats()[0]
    assert stats["secure"] and stats["auth_accepted"] >= 1 and stats["auth_refused"] == 0


def _intruder(keys: Path, kind: str) -> ClientKeys | None:
    good = ClientKeys.from_dir(keys / "cluster", "worker0")
    stranger = ClientKeys.from_dir(keys / "other", "worker0")
    return {
        "no security": None,
        "unlisted client key": ClientKeys(stranger.public, stranger.secret, good.server_public),
        "wrong server key": ClientKeys(good.public, good.secret, stranger.server_public),
    }[kind]


@pytest.mark.parametrize("kind", ["no security", "unlisted client key", "wrong server key"])
def test_without_the_right_keys_nothing_comes_back(keys, kind):
    with secure_server(keys / "cluster") as server:
        t0 = time.monotonic()
        with PSClient([server.address], 0, security=_intruder(keys, kind), timeout=1.0,
                      retry_interval=0.2) as c:
            with pytest.raises(PSTimeoutError, match=r"no reply to register \(seq 1\) within "
                                                     r"1 s from server\(s\) 0 \(tcp://127"):
                c.register()
            with pytest.raises(PSTimeoutError):  # reading is refused as well
                c.wait(c.pull(), timeout=0.3)
            with pytest.raises(PSTimeoutError):
                c.stats(timeout=0.3)
            assert c.bytes_received == 0 and c.unmatched_replies == 0
        assert time.monotonic() - t0 < 5  # refused quickly, not after some long timeout
        stats = server.stats()
    assert stats["requests"] == {} and stats["version"] == 0  # nothing reached the loop
    if kind == "unlisted client key":
        assert stats["auth_refused"] >= 1
    assert stats["handshakes_failed"] >= 1
    print(f"\n{kind}: refused, {stats['handshakes_failed']} failed handshakes, "
          f"{stats['auth_refused']} ZAP refusals")


def test_the_refusal_is_explained_to_the_client(keys):
    with secure_server(keys / "cluster") as server, \
            PSClient([server.address], 0, security=_intruder(keys, "unlisted client key"),
                     timeout=1.0) as c:
        with pytest.raises(PSTimeoutError, match="refused this client's key"):
            c.register()


def test_a_raw_tcp_peer_reads_no_parameter_bytes(keys):
    """Speak ZMTP 3.0 with the NULL mechanism by hand: the server answers its greeting
    and hangs up; no parameter byte ever appears on the wire."""
    with secure_server(keys / "cluster") as server:
        host, port = server.address.rsplit("/", 1)[1].rsplit(":", 1)
        greeting = (b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0")
                    + b"\0" + b"\0" * 31)
        ready = b"\x04\x1a\x05READY\x0bSocket-Type\x00\x00\x00\x06DEALER"
        request = b"\x01\x00" + b"\x00\x05hello"
        received = b""
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(greeting + ready + request)
            s.settimeout(1.0)
            try:
                while chunk := s.recv(65536):
                    received += chunk
            except (TimeoutError, ConnectionResetError):
                pass
        stats = server.stats()
    assert len(received) <= 128  # the server's greeting and an ERROR command at most
    for a in PARAMS.values():
        assert a.tobytes()[:16] not in received
    assert stats["requests"] == {}


def test_binding_beyond_this_machine_needs_keys(keys):
    for address in ("tcp://0.0.0.0:0", "tcp://*:0"):
        with pytest.raises(SecurityError, match=r"distnet keygen --dir cluster/keys"):
            ParameterServer(PARAMS, bind=address)
    server = ParameterServer(PARAMS, bind="tcp://0.0.0.0:0", allow_insecure=True)
    server.stop()
    with secure_server(keys / "cluster", bind="tcp://0.0.0.0:0") as server:
        port = server.address.rsplit(":", 1)[1]
        with PSClient([f"tcp://127.0.0.1:{port}"], 0, security=keys / "cluster") as c:
            assert c.register().names == list(PARAMS)


@pytest.mark.parametrize("address, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.3.2.1:0", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/ps.sock", True), ("inproc://ps", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.77.0.1:5555", False),
    ("tcp://eth0:5555", False), ("tcp://example.com:1", False), ("udp://127.0.0.1:1", False),
])
def test_is_local_address(address, local):
    assert is_local_address(address) is local


def test_key_files_and_errors(keys, tmp_path):
    root = keys / "cluster"
    assert sorted(p.name for p in (root / "clients").iterdir()) == [
        "worker0.key", "worker0.key_secret", "worker1.key", "worker1.key_secret"]
    assert os.stat(root / "server.key_secret").st_mode & 0o077 == 0  # owner only
    server = ServerKeys.from_dir(root)
    assert len(server.allowed) == 2 and server.public not in server.allowed
    before = (root / "server.key").read_bytes()
    assert cli.main(["keygen", "--dir", str(root)]) == 0  # kept, not replaced
    assert (root / "server.key").read_bytes() == before
    with pytest.raises(SecurityError, match="key file not found.*distnet keygen"):
        ServerKeys.from_dir(tmp_path)
    assert cli.main(["keygen", "--dir", str(tmp_path / "lonely")]) == 0
    with pytest.raises(SecurityError, match="no client public keys"):
        ServerKeys.from_dir(tmp_path / "lonely")
    with pytest.raises(SecurityError, match="worker7.key_secret"):
        PSClient(["tcp://127.0.0.1:1"], 7, security=root)
    assert client_names(None, "a, b_2") == ["a", "b_2"] and client_names(2, None) == [
        "worker0", "worker1"]
    with pytest.raises(ValueError, match="--names"):
        client_names(None, "a,../b")
    assert cli.main(["keygen", "--dir", str(tmp_path / "k"), "--names", "x,x"]) == 1


def test_a_curve_server_socket_needs_a_zap_handler(keys):
    ctx = zmq.Context()
    try:
        with pytest.raises(SecurityError, match="ZapHandler"):
            make_socket(zmq.ROUTER, security=ServerKeys.from_dir(keys / "cluster"), context=ctx)
    finally:
        ctx.term()


def test_a_secured_server_keeps_its_parameters_out_of_shared_memory(keys):
    """Its data must not bypass the encryption: no /dev/shm segment is offered."""
    server = ParameterServer({"w": np.zeros(4, np.float32)}, mode="sync", num_workers=1,
                             security=keys / "cluster")
    try:
        assert server.segment is None
    finally:
        server.stop()
