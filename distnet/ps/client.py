"""The worker's side: push gradients and pull parameters with tickets (ps-lite style).

    client = PSClient(["tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"], worker_id=rank)
    layout = client.register()
    version, params = client.wait(client.pull())
    for batch in data:
        ...backward...
        t = client.push_pull(grads, version)       # returns at once
        version, params = client.wait(t)          # blocks until every shard answered

``push``/``pull``/``push_pull``/``clock``/``barrier`` send their requests to every
shard at once and return a ``Ticket`` without waiting, so the transfer overlaps
whatever the worker does next. There is no background thread: ZeroMQ's own I/O
thread moves the bytes while Python computes, and replies queue in the sockets
until ``wait`` polls them and matches each to its ticket by sequence number. (A
Python I/O thread would only add GIL hand-offs, and pyzmq sockets must not be
shared between threads.) One client belongs to one thread.

Arrays passed to ``push``/``push_pull`` are sent without a copy: do not modify them
until ``wait`` on that ticket returns (the server has received them by then).
Pulled arrays are zero-copy views of the received frames unless ``out=`` names
arrays (e.g. the model's parameters) to copy into.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from distnet import backend
from distnet.ps.codecs import build_codec
from distnet.ps.protocol import (
    DEFAULT_LIMITS,
    DTYPES,
    Entry,
    Limits,
    Message,
    ProtocolError,
    decode,
    encode,
)
from distnet.ps.sharding import ShardPlan, gather, key_name, plan_from_layouts, split
from distnet.ps.transport import DEFAULT_OPTIONS, SocketOptions, connect_dealer, frames_nbytes

_DENSE = build_codec("none")


class PSError(RuntimeError):
    """A server answered a request with an error (the text is the server's)."""


class PSTimeoutError(TimeoutError):
    """No reply within the timeout; the text says what was awaited, from whom."""


@dataclass(frozen=True)
class Layout:
    """What the servers hold, as ``register`` reports it.

    names: parameter names in order; shapes/dtypes: name -> full shape/dtype;
    version: the (lowest) server version; plan: which server holds which rows.
    """

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    version: int
    plan: ShardPlan
    mode: str
    num_workers: int
    staleness: int


@dataclass
class Ticket:
    """An outstanding request: its op, sequence number and the replies so far."""

    op: str
    seq: int
    servers: tuple[int, ...]
    replies: dict[int, Message]
    out: dict[str, np.ndarray] | None = None


class PSClient:
    """One worker's connection to every server shard (one DEALER per address).

    codec/codec_config: gradient compression (``codecs.CODECS``); int8 is seeded
    with the worker id unless ``codec_config`` gives a seed. timeout: default
    seconds ``wait`` allows.
    """

    def __init__(self, addresses: list[str], worker_id: int, *, codec: str = "none",
                 codec_config: dict[str, Any] | None = None, timeout: float = 60.0,
                 socket_options: SocketOptions = DEFAULT_OPTIONS, security: Any = None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        if not addresses:
            raise ValueError("PSClient needs at least one server address")
        config = dict(codec_config or {})
        if codec == "int8":
            config.setdefault("seed", worker_id)
        self.codec = build_codec(codec, **config)
        self.addresses, self.worker_id, self.timeout = list(addresses), worker_id, timeout
        self.limits = limits
        self.layout: Layout | None = None
        self.bytes_sent = self.bytes_received = self.unmatched_replies = 0
        self._seq = 0
        self._open: dict[int, Ticket] = {}
        self._socks = [connect_dealer(a, options=socket_options, security=security)
                       for a in self.addresses]
        self._poller = zmq.Poller()
        for sock in self._socks:
            self._poller.register(sock, zmq.POLLIN)

    # ---- requests -----------------------------------------------------------------------
    def register(self) -> Layout:
        """Announce this worker to every shard; returns (and keeps) the layout."""
        result = self.wait(self._send("register", [{} for _ in self._socks]))
        self.layout = result
        return result

    def push(self, grads: dict[str, Any], version: int) -> Ticket:
        """Send gradients (name -> array, full shapes) computed on parameters ``version``.

        ``wait`` returns the lowest server version after it was accepted.
        """
        return self._send("push", self._gradient_parts(grads), ver=version)

    def push_pull(self, grads: dict[str, Any], version: int, *,
                  out: dict[str, np.ndarray] | None = None) -> Ticket:
        """Push, then receive the parameters the server has after applying it (sync mode:
        after the whole round). ``wait`` returns ``(version, name -> array)``."""
        return self._send("push_pull", self._gradient_parts(grads), ver=version, out=out)

    def pull(self, since_version: int | None = None, *,
             out: dict[str, np.ndarray] | None = None) -> Ticket:
        """Parameters; with ``since_version`` a shard at or below it answers 'not modified'
        and sends nothing. ``wait`` returns ``(version, name -> array)`` (empty when not
        modified)."""
        extra = {} if since_version is None else {"since": int(since_version)}
        return self._send("pull", self._empty(), out=out, **extra)

    def clock(self, c: int) -> Ticket:
        """Advance this worker's clock to ``c`` (SSP/BSP). ``wait`` returns the slowest
        worker's clock once this worker may proceed (``c - min_clock <= staleness``)."""
        return self._send("clock", self._empty(), ver=c)

    def barrier(self) -> Ticket:
        """Wait (with ``wait``) until every worker has reached the barrier."""
        return self._send("barrier", self._empty())

    def stats(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Each shard's counters (blocking)."""
        return self.wait(self._send("stats", self._empty()), timeout)

    def shutdown(self, timeout: float | None = None) -> None:
        """Tell every shard to stop (blocking until each acknowledges)."""
        self.wait(self._send("shutdown", self._empty()), timeout)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._open.clear()

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- building and sending -------------------------------------------------------------
    def _empty(self) -> list[dict[str, np.ndarray]]:
        return [{} for _ in self._socks]

    def _gradient_parts(self, grads: dict[str, Any]) -> list[dict[str, np.ndarray]]:
        lay = self._need_layout()
        unknown = sorted(set(grads) - set(lay.shapes))
        if unknown:
            raise KeyError(f"gradients for unknown parameters {unknown[:5]}")
        host = {}
        for name, g in grads.items():
            a = np.asarray(backend.to_host(g), dtype=lay.dtypes[name])  # no copy if it matches
            if a.shape != lay.shapes[name]:
                raise ValueError(f"gradient {name!r} has shape {a.shape}, parameter "
                                 f"{lay.shapes[name]}")
            host[name] = a
        return split(host, lay.plan)

    def _send(self, op: str, parts: list[dict[str, np.ndarray]], *, ver: int = 0,
              out: dict[str, np.ndarray] | None = None, **extra: Any) -> Ticket:
        self._seq += 1
        ticket = Ticket(op, self._seq, tuple(range(len(self._socks))), {}, out)
        codec = self.codec if op in ("push", "push_pull") else _DENSE
        for i, part in enumerate(parts):
            entries = []
            for key, arr in part.items():
                payload, meta = codec.compress(key, arr)
                entries.append(Entry(key, arr.dtype, arr.shape, payload, meta))
            header = {"op": op, "wid": self.worker_id, "seq": ticket.seq, "ver": int(ver), **extra}
            frames = encode(header, entries, codec=codec.name)
            try:
                self._socks[i].send_multipart(frames, copy=False)
            except zmq.Again:
                raise PSTimeoutError(f"could not queue {op} for server {i} "
                                     f"({self.addresses[i]}): its send queue is full") from None
            self.bytes_sent += frames_nbytes(frames)
        self._open[ticket.seq] = ticket
        return ticket

    def _need_layout(self) -> Layout:
        if self.layout is None:
            raise RuntimeError("call register() before pushing gradients")
        return self.layout

    # ---- waiting ------------------------------------------------------------------------
    def wait(self, ticket: Ticket, timeout: float | None = None) -> Any:
        """Block until every shard answered ``ticket``; returns the op's result.

        Raises PSError with the server's message on an error reply, PSTimeoutError
        naming the silent shards after ``timeout`` (default: the client's).
        """
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while len(ticket.replies) < len(ticket.servers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                silent = [f"{i} ({self.addresses[i]})" for i in ticket.servers
                          if i not in ticket.replies]
                raise PSTimeoutError(f"no reply to {ticket.op} (seq {ticket.seq}) within "
                                     f"{limit:g} s from server(s) {', '.join(silent)}")
            for sock, _ in self._poller.poll(max(1, int(remaining * 1000))):
                self._drain(self._socks.index(sock))
        self._open.pop(ticket.seq, None)
        return self._result(ticket)

    def _drain(self, i: int) -> None:
        sock = self._socks[i]
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = decode(frames, reply=True, limits=self.limits)
            except ProtocolError as exc:
                raise PSError(f"server {i} ({self.addresses[i]}) sent a bad reply: {exc}") from None
            self.bytes_received += msg.nbytes
            ticket = self._open.get(msg.header["seq"])
            if ticket is None or i in ticket.replies:
                self.unmatched_replies += 1  # a late reply to a resent or abandoned request
                continue
            ticket.replies[i] = msg

    def _result(self, ticket: Ticket) -> Any:
        errors = [f"server {i} ({self.addresses[i]}): {m.header.get('message', '')}"
                  for i, m in sorted(ticket.replies.items()) if m.header["status"] == "error"]
        if errors:
            raise PSError(f"{ticket.op} failed: " + "; ".join(errors))
        replies = [ticket.replies[i] for i in ticket.servers]
        version = min(m.header["ver"] for m in replies)
        if ticket.op == "register":
            return _layout_from(replies, version)
        if ticket.op in ("pull", "push_pull"):
            return version, self._gather(replies, ticket.out)
        if ticket.op == "push":
            return version
        if ticket.op == "clock":
            return min(int(m.header.get("min_clock", version)) for m in replies)
        if ticket.op == "stats":
            return [_int_keys(m.header.get("stats", {})) for m in replies]
        return None

    def _gather(self, replies: list[Message], out: dict[str, np.ndarray] | None,
                ) -> dict[str, np.ndarray]:
        plan = self._need_layout().plan
        fresh = {i for i, m in enumerate(replies) if not m.header.get("not_modified")}
        if not fresh:
            return {}
        if len(fresh) < len(replies):  # only names whose every piece came back
            names = {p.name for p in plan.pieces} - {
                p.name for p in plan.pieces if p.server not in fresh}
            plan = ShardPlan(plan.num_servers, {n: s for n, s in plan.shapes.items()
                                                if n in names},
                             tuple(p for p in plan.pieces if p.name in names))
        per_server = [m.arrays() if i in fresh else {} for i, m in enumerate(replies)]
        return gather(per_server, plan, out)


def _int_keys(stats: dict[str, Any]) -> dict[str, Any]:
    """Stats maps keyed by worker id or staleness travel with string keys; restore ints."""
    out = dict(stats)
    for field in ("clocks", "staleness_hist"):
        if isinstance(out.get(field), dict):
            out[field] = {int(k): v for k, v in out[field].items()}
    return out


def _layout_from(replies: list[Message], version: int) -> Layout:
    layouts, dtypes = [], {}
    for i, m in enumerate(replies):
        lay = m.header.get("layout")
        ok = (isinstance(lay, dict) and all(isinstance(lay.get(f), list)
                                            for f in ("keys", "shapes", "dtypes"))
              and len(lay["keys"]) == len(lay["shapes"]) == len(lay["dtypes"])
              and all(d in DTYPES for d in lay["dtypes"]))
        if not ok:
            raise PSError(f"server {i} sent a malformed layout in its register reply")
        layouts.append({k: tuple(s) for k, s in zip(lay["keys"], lay["shapes"], strict=True)})
        for k, d in zip(lay["keys"], lay["dtypes"], strict=True):
            dtypes[key_name(k)] = DTYPES[d]
    plan = plan_from_layouts(layouts)
    first = replies[0].header["layout"]
    return Layout(plan.names, dict(plan.shapes), {n: dtypes[n] for n in plan.names}, version,
                  plan, str(first.get("mode")), int(first.get("num_workers", 0)),
                  int(first.get("staleness", 0)))
