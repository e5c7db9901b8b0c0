"""A worker's connections to its servers: sockets, connection events, heartbeats.

``ServerLinks`` owns one DEALER per server and a monitor on each, and keeps what
the monitors say: how many times each connection has been lost (its
*generation*), since when it is down, and why a handshake failed (a refused CURVE
key, a wrong server key). ZeroMQ reconnects by itself with exponential backoff
(``SocketOptions.reconnect_ivl_ms`` doubling to ``reconnect_ivl_max_ms``); the
client resends what was in flight when a connection comes back.

``Heartbeat`` pings every server from a thread with sockets of its own (a socket
belongs to one thread), so a worker that computes for a long time is still seen
alive by the servers' ``worker_timeout``. It stops when the client closes, or when
its process dies, which is exactly what the servers need to notice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import zmq

from distnet.ps.protocol import encode
from distnet.ps.transport import SocketOptions, connect_dealer, monitor, read_events

_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the server refused this client's key (authentication "
                                     "failed: is its public key in the server's clients/?)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the security handshake failed (a client without "
                                         "keys, or keys for another server?)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake failed (wrong server key, "
                                          "or security on one side only?)",
}


class ServerLinks:
    """One DEALER per address, with its connection state (index = server id)."""

    def __init__(self, addresses: list[str], *, options: SocketOptions, security: Any) -> None:
        self.addresses = list(addresses)
        n = len(self.addresses)
        self.socks: list[zmq.Socket] = []
        self.monitors: list[zmq.Socket] = []
        try:
            for a in self.addresses:
                self.socks.append(connect_dealer(a, options=options, security=security))
                self.monitors.append(monitor(self.socks[-1]))
        except BaseException:
            self.close()
            raise
        self.generation = [0] * n  # connections lost so far, per server
        self.down_since: list[float | None] = [None] * n
        self.connected_once = [False] * n
        self.failure = [""] * n  # why the last handshake failed, "" once one succeeds
        self.disconnects = 0
        self.local: list[Any] = [None] * n  # same-host channels (local.LocalPeer)
        self.poller = zmq.Poller()
        self._where: dict[Any, tuple[str, int]] = {}
        for i, (sock, mon) in enumerate(zip(self.socks, self.monitors, strict=True)):
            self.poller.register(sock, zmq.POLLIN)
            self.poller.register(mon, zmq.POLLIN)
            self._where[sock], self._where[mon] = ("data", i), ("events", i)

    def poll(self, timeout_ms: int) -> list[tuple[str, int]]:
        """``(kind, server)`` for each socket with something to read: kind "data" (the
        DEALER), "events" (its monitor) or "local" (the same-host channel)."""
        return [self._where[s] for s, _ in self.poller.poll(timeout_ms)]

    def set_local(self, i: int, peer: Any) -> None:
        """Use ``peer`` (or nothing, None) as server ``i``'s same-host channel."""
        old, self.local[i] = self.local[i], peer
        if old is not None:
            self.poller.unregister(old.fd)
            del self._where[old.fd]
            old.close()
        if peer is not None:
            self.poller.register(peer.fd, zmq.POLLIN)
            self._where[peer.fd] = ("local", i)

    def events(self, i: int) -> bool:
        """Take server ``i``'s connection events; True when a connection was
        re-established since a loss (what was in flight before must be resent)."""
        back = False
        for event, _ in read_events(self.monitors[i]):
            if event == zmq.EVENT_DISCONNECTED:
                self.generation[i] += 1
                self.disconnects += 1
                self.down_since[i] = self.down_since[i] or time.monotonic()
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                back = back or self.generation[i] > 0
                self.down_since[i], self.failure[i] = None, ""
                self.connected_once[i] = True
            elif event in _FAILURES:
                self.failure[i] = _FAILURES[event]
        return back

    def describe(self, i: int) -> str:
        """The state of server ``i``'s connection, for a timeout message."""
        if self.failure[i]:
            return self.failure[i]
        if self.down_since[i] is not None:
            return (f"connection lost {time.monotonic() - self.down_since[i]:.1f} s ago, "
                    "reconnecting")
        if not self.connected_once[i]:
            return "never connected (is the server running at that address?)"
        return "connected"

    def close(self) -> None:
        for i, peer in enumerate(self.local):
            if peer is not None:
                self.set_local(i, None)
        for sock, mon in zip(self.socks, self.monitors, strict=False):
            sock.disable_monitor()
            mon.close(linger=0)
        for sock in self.socks:
            sock.close()


class Heartbeat:
    """Sends ``ping`` for worker ``worker_id`` to every server each ``interval`` seconds."""

    def __init__(self, addresses: list[str], worker_id: int, interval: float, *,
                 options: SocketOptions, security: Any) -> None:
        self.addresses, self.worker_id, self.interval = list(addresses), worker_id, interval
        self.options, self.security = replace(options, linger_ms=0), security
        self.sent = self.replies = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ps-heartbeat-{worker_id}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        socks = [connect_dealer(a, options=self.options, security=self.security)
                 for a in self.addresses]
        frames = encode({"op": "ping", "wid": self.worker_id, "seq": 0, "ver": 0})
        try:
            while True:
                for sock in socks:
                    while sock.poll(0):  # the answers only say "alive": count and drop them
                        sock.recv_multipart()
                        self.replies += 1
                    try:
                        sock.send_multipart(frames, zmq.NOBLOCK)
                        self.sent += 1
                    except zmq.Again:  # the server is away and the queue is full: skip
                        pass
                if self._stop.wait(self.interval):
                    return
        finally:
            for sock in socks:
                sock.close(linger=0)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
