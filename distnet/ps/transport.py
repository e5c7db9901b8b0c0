"""ZeroMQ sockets for the parameter server: the thin "Van" layer of ps-lite.

Every socket is made by ``make_socket``, the one place that sets options and
applies security (CURVE keys from ``distnet.ps.auth``) when ``security`` is given,
so authentication is added here and nowhere else. The server binds a ROUTER
(``bind_router``), each client connects one DEALER per server
(``connect_dealer``). Sends pass NumPy buffers with ``copy=False``; receives return
``zmq.Frame`` objects whose memory NumPy can wrap without a copy.

Timeouts are poll based (``recv_frames(sock, timeout_s)``) so callers never block
for ever; SNDTIMEO bounds a send into a full pipe. A DEALER whose server goes away
reconnects by itself, with ZeroMQ's exponential backoff (``reconnect_ivl_ms``
doubling up to ``reconnect_ivl_max_ms``); ``monitor`` reports those events.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from distnet.ps.auth import ClientKeys, ServerKeys, apply_keys


class TransportError(RuntimeError):
    """A socket could not be created, bound, connected or used."""


class UnsupportedSecurity(TypeError, NotImplementedError):
    """``security`` is not CURVE keys (NotImplementedError too: what callers caught when
    no security existed)."""


@dataclass(frozen=True)
class SocketOptions:
    """Options applied to every socket (milliseconds, bytes; -1 = no limit).

    max_message_bytes: ZMQ_MAXMSGSIZE, the largest inbound frame; a peer that
    sends more is disconnected by ZeroMQ before any of it reaches Python.
    heartbeat_*: ZMTP heartbeats (ZMQ_HEARTBEAT_IVL/TIMEOUT/TTL) so a dead peer's
    connection is noticed and closed; 0 turns them off.
    """

    linger_ms: int = 1000
    send_timeout_ms: int = 10_000
    max_message_bytes: int = 1 << 32
    send_hwm: int = 1000
    recv_hwm: int = 1000
    heartbeat_ivl_ms: int = 2000
    heartbeat_timeout_ms: int = 20_000
    heartbeat_ttl_ms: int = 20_000
    reconnect_ivl_ms: int = 100
    reconnect_ivl_max_ms: int = 5000


DEFAULT_OPTIONS = SocketOptions()


def _apply_security(sock: zmq.Socket, security: Any, *, server: bool) -> None:
    """CURVE authentication: the single place it is configured."""
    if security is None:
        return
    if not isinstance(security, (ServerKeys, ClientKeys)):
        raise UnsupportedSecurity(
            f"security must be CURVE keys (distnet.ps.auth.ServerKeys for a server, "
            f"ClientKeys for a client), got {type(security).__name__}")
    apply_keys(sock, security, server=server)


def make_socket(kind: int, *, options: SocketOptions = DEFAULT_OPTIONS, security: Any = None,
                context: zmq.Context | None = None) -> zmq.Socket:
    """A configured socket of ``kind`` (zmq.ROUTER, zmq.DEALER, ...)."""
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(kind)
    try:
        sock.setsockopt(zmq.LINGER, options.linger_ms)
        sock.setsockopt(zmq.SNDTIMEO, options.send_timeout_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, options.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, options.send_hwm)
        sock.setsockopt(zmq.RCVHWM, options.recv_hwm)
        sock.setsockopt(zmq.RECONNECT_IVL, options.reconnect_ivl_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, options.reconnect_ivl_max_ms)
        if options.heartbeat_ivl_ms > 0:
            sock.setsockopt(zmq.HEARTBEAT_IVL, options.heartbeat_ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, options.heartbeat_timeout_ms)
            sock.setsockopt(zmq.HEARTBEAT_TTL, options.heartbeat_ttl_ms)
        if kind == zmq.ROUTER:
            # a reply to a peer that has gone raises EHOSTUNREACH instead of vanishing
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        _apply_security(sock, security, server=kind == zmq.ROUTER)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def bind_router(address: str = "tcp://127.0.0.1:0", *, options: SocketOptions = DEFAULT_OPTIONS,
                security: Any = None, context: zmq.Context | None = None,
                ) -> tuple[zmq.Socket, str]:
    """A ROUTER bound to ``address``; returns it and the endpoint actually bound.

    ``tcp://HOST:0`` picks a free port and the returned endpoint names it;
    ``tcp://*:PORT`` binds every interface (reported as ``tcp://0.0.0.0:PORT``).
    """
    sock = _attached(zmq.ROUTER, "bind", address, options, security, context)
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def connect_dealer(address: str, *, options: SocketOptions = DEFAULT_OPTIONS,
                   security: Any = None, context: zmq.Context | None = None) -> zmq.Socket:
    """A DEALER connected to ``address`` (the connection completes in the background)."""
    return _attached(zmq.DEALER, "connect", address, options, security, context)


def _attached(kind: int, verb: str, address: str, options: SocketOptions, security: Any,
              context: zmq.Context | None) -> zmq.Socket:
    """A socket of ``kind`` that has ``bind``/``connect``-ed to ``address``, or a
    TransportError naming the address (the half-made socket is closed)."""
    sock = make_socket(kind, options=options, security=security, context=context)
    try:
        getattr(sock, verb)(address)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        where = f"to {address}" if verb == "connect" else address
        raise TransportError(f"cannot {verb} {where}: {exc}") from None
    return sock


def send_frames(sock: zmq.Socket, frames: list[Any], *, track: bool = False,
                noblock: bool = False) -> zmq.MessageTracker | None:
    """Send a multipart message without copying its arrays.

    With ``track`` the returned tracker says when ZeroMQ has let go of *every*
    buffer, i.e. when they may be modified again (pyzmq's own send_multipart
    returns the tracker of the last frame only). With ``noblock`` a full pipe raises
    zmq.Again at once (a ROUTER checks only the first frame: the rest always follow).
    """
    trackers = []
    last = len(frames) - 1
    flag = zmq.NOBLOCK if noblock else 0
    for i, frame in enumerate(frames):
        t = sock.send(frame, (zmq.SNDMORE if i < last else 0) | flag, copy=False, track=track)
        if track and t is not None:
            trackers.append(t)
    return zmq.MessageTracker(*trackers) if track else None


def recv_frames(sock: zmq.Socket, timeout_s: float | None) -> list[zmq.Frame] | None:
    """The next multipart message (zero-copy frames), or None after ``timeout_s``."""
    timeout_ms = None if timeout_s is None else max(0, int(timeout_s * 1000))
    if not sock.poll(timeout_ms, zmq.POLLIN):
        return None
    return sock.recv_multipart(copy=False)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc refuses an mmap threshold above half its 64 MiB per-thread heap
_KEEP_BELOW = 32 << 20


def keep_receive_buffers() -> bool:
    """Let this process's allocator keep freed message buffers for the next messages
    (glibc only). A process-wide setting: ``distnet.dist.server_role.serve`` applies it
    to server processes.

    Why: ZeroMQ allocates every received frame anew and frees it when the last view
    goes. glibc hands blocks of these sizes back to the kernel as soon as more than
    twice the largest recent block is free at the top of a heap, which a round of
    several shards always frees: the next round's frames are then page-faulted in
    again, one fault per 4 KiB, by the I/O thread that copies them in. A server of 8
    shards of a 16 MB model faulted about 500 pages per round trip. Raising the mmap
    and trim thresholds keeps up to ``_KEEP_BELOW``-sized blocks in the process for
    reuse, as the buffer pools of ps-lite and BytePS do; the cost is that memory is
    returned to the system at exit rather than between messages. Returns whether it
    took effect (False off glibc, where the allocator's own policy stays).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW)
                and mallopt(_M_TRIM_THRESHOLD, 8 * _KEEP_BELOW))


def frames_nbytes(frames: list[Any]) -> int:
    """Total bytes of a list of frames (zmq.Frame, bytes or arrays)."""
    total = 0
    for f in frames:
        total += f.nbytes if hasattr(f, "nbytes") else len(f)
    return total


# connection events a client acts on: lost, re-established, refused
MONITOR_EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def monitor(sock: zmq.Socket, events: int = MONITOR_EVENTS) -> zmq.Socket:
    """A PAIR socket receiving ``sock``'s connection events (read with ``read_events``)."""
    return sock.get_monitor_socket(events)


def read_events(mon: zmq.Socket) -> list[tuple[int, int]]:
    """Every pending ``(event, value)`` of a monitor socket, without blocking."""
    out = []
    while mon.poll(0):
        msg = recv_monitor_message(mon)
        out.append((int(msg["event"]), int(msg["value"])))
    return out
