"""Same-host messages without ZeroMQ: a Unix seqpacket channel from a worker to a server.

Why: ZeroMQ hands every message to an I/O thread on each side, so one message costs
three thread wake-ups. In a co-located sync job on 2 cores the server's I/O thread
shares its process (and a core) with a worker's compute and the server's own thread,
and the remote worker's header took 0.33 ms to reach the server and its reply 0.47 ms
to come back, where a bare Unix socket round trip takes ~0.05 ms. A seqpacket
``send`` writes straight into the peer's queue and wakes the thread waiting on it.

What goes on it: only messages without array frames (one header each way), and only
between a server and a worker attached to its shared-memory segment (``shm.py``),
whose arrays are in the segment anyway. Everything else, and any reply that has array
frames, goes over ZeroMQ as before; a channel that breaks is dropped and its traffic
returns to ZeroMQ, whose reconnection and resends then apply.

Names live in Linux's abstract socket namespace (no file to leave behind, nothing to
clean up after a crash), derived from the segment's random name. Who may connect is
checked with SO_PEERCRED, not file permissions: the server accepts only processes of
its own user, and a worker talks only to a listener of its own user. Every message
is still decoded and validated like one from the network (``protocol.decode``).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import logging
import os
import socket
import struct
import sys
import termios
from typing import Any

log = logging.getLogger("distnet.ps.local")

AVAILABLE = sys.platform.startswith("linux")  # abstract names and SO_PEERCRED are Linux's
MAX_MESSAGE = 1 << 16  # a header; a longer message is refused (and would have gone by ZeroMQ)
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def address(segment_name: str) -> str:
    """The abstract address of the server that owns segment ``segment_name``."""
    return "\0" + segment_name + ".ps"


def _peer_uid(sock: socket.socket) -> int:
    return _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[1]


class LocalPeer:
    """One connected channel (the server's end of a worker's, or the worker's own)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # what pollers know it by (pyzmq's reports descriptors)
        self._count = array.array("i", [0])
        self.closed = False

    def send(self, frames: list[Any]) -> bool:
        """Send a one-frame message; False (nothing sent) when it has array frames, is too
        long, the peer's queue is full, or the channel is broken (then it is closed)."""
        if self.closed or len(frames) != 1 or len(frames[0]) > MAX_MESSAGE:
            return False
        try:
            self.sock.send(frames[0])
        except BlockingIOError:
            return False
        except OSError as exc:
            log.info("same-host channel broken on send: %s", exc)
            self.close()
            return False
        return True

    def receive(self) -> list[bytes] | None:
        """Every message queued now (without blocking); None when the channel is closed
        (by the peer, or here after a message that was cut off: not the protocol)."""
        out = []
        while not self.closed:
            try:
                data, _, flags, _ = self.sock.recvmsg(MAX_MESSAGE)
            except BlockingIOError:
                break
            except OSError as exc:
                log.info("same-host channel broken on receive: %s", exc)
                self.close()
                break
            if not data or flags & socket.MSG_TRUNC:
                if data:
                    log.warning("same-host channel: a message longer than %d bytes; closing it",
                                MAX_MESSAGE)
                self.close()
                break
            out.append(data)
            if not self._queued():
                break  # asking again would only raise BlockingIOError (~2-10 us)
        return None if self.closed and not out else out

    def _queued(self) -> int:
        """Bytes waiting to be received (0: none, or the peer closed: recv says which)."""
        try:
            fcntl.ioctl(self.fd, termios.FIONREAD, self._count)
        except OSError:
            return 1  # let recvmsg find out
        return self._count[0]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class LocalListener:
    """The server's end: accepts same-user workers on ``address(segment_name)``."""

    def __init__(self, segment_name: str) -> None:
        self.address = address(segment_name)
        self.refused = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.sock.bind(self.address)
            self.sock.listen(64)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.fd = self.sock.fileno()

    def accept(self) -> list[LocalPeer]:
        """The connections waiting now, from processes of this user (others are closed)."""
        peers = []
        while True:
            try:
                sock, _ = self.sock.accept()
            except BlockingIOError:
                return peers
            except OSError as exc:
                log.info("same-host channel: accept failed: %s", exc)
                return peers
            if _peer_uid(sock) != os.getuid():
                self.refused += 1
                log.warning("same-host channel: refused a process of user %d", _peer_uid(sock))
                sock.close()
                continue
            sock.setblocking(False)
            peers.append(LocalPeer(sock))

    def close(self) -> None:
        self.sock.close()


def listen(segment_name: str) -> LocalListener | None:
    """A listener for the server of ``segment_name``, or None where there can be none
    (not Linux, the name is taken, or ``DISTNET_LOCAL_CHANNEL=0`` in the server's
    environment); the server then serves ZeroMQ alone."""
    if not AVAILABLE or os.environ.get("DISTNET_LOCAL_CHANNEL", "1") == "0":
        return None
    try:
        return LocalListener(segment_name)
    except OSError as exc:
        log.info("no same-host channel: %s", exc)
        return None


def connect(segment_name: str) -> LocalPeer | None:
    """The worker's channel to the server of ``segment_name``; None when it cannot be had
    (another network namespace, the server is gone, or it runs as another user)."""
    if not AVAILABLE:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.settimeout(1.0)  # a listener's backlog is full only while it is not serving
        sock.connect(address(segment_name))
        if _peer_uid(sock) != os.getuid():
            raise PermissionError("the listener belongs to another user")
        sock.setblocking(False)
    except OSError as exc:
        log.info("no same-host channel to %s: %s", segment_name, exc)
        with contextlib.suppress(OSError):
            sock.close()
        return None
    return LocalPeer(sock)
