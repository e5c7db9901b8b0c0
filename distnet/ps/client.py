"""The worker's side: push gradients and pull parameters with tickets (ps-lite style).

    client = PSClient(["tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"], worker_id=rank,
                      security="cluster/keys")
    layout = client.register()
    version, params = client.wait(client.pull())
    for batch in data:
        ...backward...
        t = client.push_pull(grads, version)       # returns at once
        version, params = client.wait(t)          # blocks until every shard answered

``push``/``pull``/``push_pull``/``clock``/``barrier`` send their requests to every
shard at once and return a ``Ticket`` without waiting, so the transfer overlaps
whatever the worker does next. ZeroMQ's own I/O thread moves the bytes while
Python computes; ``wait`` polls the replies and matches them to tickets by sequence
number. One client belongs to one thread (pyzmq sockets must not be shared); its
only helper thread sends heartbeats on sockets of its own (``links.Heartbeat``).

Reliability: a server that goes away (a crash, a restart from a checkpoint) is
reconnected to by ZeroMQ with exponential backoff; ``wait`` then resends what that
server had not answered, with the same sequence number, so the server applies a
gradient at most once. Without any sign of life a request is also resent after
``retry_interval`` seconds, doubling up to ``retry_max_interval``. A server that
no longer knows this worker (``code: unregistered``) is registered with again and
the request resent. After ``timeout`` seconds ``wait`` raises PSTimeoutError naming
the op, the silent servers and the state of their connections.

Same host: when a server offers its shared-memory segment (``shm.py``) and this
worker can open it, gradients are copied into this worker's slot there and the
parameters are copied out of it; only headers go through ZeroMQ. ``bytes_sent`` /
``bytes_received`` count the wire, ``bytes_shared`` what went through the segment.

Arrays passed to ``push``/``push_pull`` are sent without a copy: do not modify them
until ``wait`` on that ticket returns (they may be sent again until then). Pulled
arrays are zero-copy views of the received frames unless ``out=`` names arrays
(e.g. the model's parameters) to copy into. With several shards each reply is
copied into ``out`` as it arrives, overlapping the copy with the other shards'
transfers; if one shard answers with an error, the shards that succeeded have
already been copied (``out`` then holds what every server holds).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from distnet import backend
from distnet.ps import local
from distnet.ps.auth import ClientKeys, client_keys
from distnet.ps.codecs import build_codec
from distnet.ps.layout import (
    Layout,
    PSError,
    gather_replies,
    int_keys,
    layout_from,
    raise_errors,
    scatter_reply,
    valid_layout,
)
from distnet.ps.links import Heartbeat, ServerLinks
from distnet.ps.protocol import (
    DEFAULT_LIMITS,
    DTYPES,
    Entry,
    Limits,
    Message,
    ProtocolError,
    decode,
    dense_entries,
)
from distnet.ps.protocol import encode as encode_message
from distnet.ps.sharding import split
from distnet.ps.shm import Segment
from distnet.ps.transport import DEFAULT_OPTIONS, SocketOptions, frames_nbytes

__all__ = ["Layout", "PSClient", "PSError", "PSTimeoutError", "Ticket"]
_DENSE = build_codec("none")
_LOCAL_OPS = ("push", "push_pull", "pull")  # what takes a same-host channel when one is open


class PSTimeoutError(TimeoutError):
    """No reply within the timeout; the text says what was awaited, from whom."""


@dataclass
class Ticket:
    """An outstanding request: its op, sequence number and the replies so far.

    frames/seqs/sent_gen/via: per server, what was sent (kept for resends), under which
    sequence number (a new one after registering again), on which connection, and
    which way ("zmq", or "local": the same-host channel).
    """

    op: str
    seq: int
    servers: tuple[int, ...]
    replies: dict[int, Message]
    out: dict[str, np.ndarray] | None = None
    frames: dict[int, list[Any]] = field(default_factory=dict)
    seqs: dict[int, int] = field(default_factory=dict)
    sent_gen: dict[int, int] = field(default_factory=dict)
    via: dict[int, str] = field(default_factory=dict)
    resends: int = 0
    reregistered: bool = False
    copied: set[int] = field(default_factory=set)  # servers whose reply is in ``out`` already
    shared: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # slots it uses


class PSClient:
    """One worker's connection to every server shard (one DEALER per address).

    codec/codec_config: gradient compression (``codecs.CODECS``); int8 is seeded
    with the worker id unless ``codec_config`` gives a seed. timeout: default
    seconds ``wait`` allows. security: ClientKeys, or a keys directory holding
    ``server.key`` and ``clients/<key_name>.key_secret`` (default name
    ``worker<id>``). heartbeat_interval: seconds between pings once registered
    (None: no heartbeat thread). retry_interval / retry_max_interval: resend
    backoff when a server is silent. shared_memory: use a same-host server's
    shared-memory segment when it offers one (codec ``none`` only).
    """

    def __init__(self, addresses: list[str], worker_id: int, *, codec: str = "none",
                 codec_config: dict[str, Any] | None = None, timeout: float = 60.0,
                 socket_options: SocketOptions = DEFAULT_OPTIONS,
                 security: ClientKeys | str | Path | None = None,
                 limits: Limits = DEFAULT_LIMITS, key_name: str | None = None,
                 heartbeat_interval: float | None = 1.0, retry_interval: float = 5.0,
                 retry_max_interval: float = 30.0, shared_memory: bool = True) -> None:
        if not addresses:
            raise ValueError("PSClient needs at least one server address")
        config = dict(codec_config or {})
        if codec == "int8":
            config.setdefault("seed", worker_id)
        self.codec = build_codec(codec, **config)
        self.addresses, self.worker_id, self.timeout = list(addresses), worker_id, timeout
        self.limits = limits
        self.layout: Layout | None = None
        self.bytes_sent = self.bytes_received = self.bytes_shared = self.unmatched_replies = 0
        self.resends = self.reregistrations = 0
        self.retry_interval, self.retry_max_interval = retry_interval, retry_max_interval
        self.heartbeat_interval = heartbeat_interval
        self._options, self._security = socket_options, client_keys(security, worker_id, key_name)
        self._seq = 0
        self._open: dict[int, Ticket] = {}
        self._links = ServerLinks(self.addresses, options=socket_options,
                                  security=self._security)
        self.shared_memory = shared_memory and self.codec.name == "none"
        self.segments: list[Segment | None] = [None] * len(self.addresses)
        self._slot_busy: dict[int, Ticket] = {}  # server -> the request using our slot there
        self._deferred: list[list[Ticket]] = [[] for _ in self.addresses]  # see _transmit
        self._views: set[int] = set()  # ids of segment arrays given out by shared_arrays
        self._heartbeat: Heartbeat | None = None

    # ---- requests -----------------------------------------------------------------------
    def register(self) -> Layout:
        """Announce this worker to every shard; returns (and keeps) the layout."""
        result = self.wait(self._send("register", self._empty()))
        self.layout = result
        if self.heartbeat_interval and self._heartbeat is None:
            self._heartbeat = Heartbeat(self.addresses, self.worker_id, self.heartbeat_interval,
                                        options=self._options, security=self._security)
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

    def resend(self, ticket: Ticket) -> None:
        """Send ``ticket``'s request again to the servers that have not answered (same
        sequence number: a server that already has it answers ``duplicate``)."""
        for i in ticket.servers:
            if i not in ticket.replies:
                self._transmit(ticket, i, resend=True)

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        self._links.close()
        self._open.clear()
        self._deferred = [[] for _ in self.addresses]
        for i, seg in enumerate(self.segments):
            if seg is not None:
                seg.close()
                self.segments[i] = None

    def __enter__(self) -> PSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- building and sending -------------------------------------------------------------
    def _empty(self) -> list[dict[str, np.ndarray]]:
        return [{} for _ in self.addresses]

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
              out: dict[str, np.ndarray] | None = None,
              servers: tuple[int, ...] | None = None, **extra: Any) -> Ticket:
        self._seq += 1
        servers = tuple(range(len(self.addresses))) if servers is None else servers
        ticket = Ticket(op, self._seq, servers, {}, out)
        codec = self.codec if op in ("push", "push_pull") else _DENSE
        for i in servers:
            header = {"op": op, "wid": self.worker_id, "seq": ticket.seq, "ver": int(ver), **extra}
            seg = self.segments[i]
            if seg is not None and op in ("pull", "push", "push_pull"):
                header["seg"] = seg.name  # the segment we read and write: the server checks it
            if seg is not None and op in ("push", "push_pull") and i not in self._slot_busy:
                ticket.frames[i] = self._into_slot(ticket, i, seg, parts[i], header)
            else:
                entries = []
                for key, arr in parts[i].items():
                    payload, meta = codec.compress(key, arr)
                    entries.append(Entry(key, arr.dtype, arr.shape, payload, meta))
                ticket.frames[i] = encode_message(header, entries, codec=codec.name)
            ticket.seqs[i] = ticket.seq
            self._transmit(ticket, i)
        self._open[ticket.seq] = ticket
        return ticket

    def _into_slot(self, ticket: Ticket, i: int, seg: Segment, part: dict[str, np.ndarray],
                   header: dict[str, Any]) -> list[Any]:
        """Copy a gradient into this worker's slot of server ``i``'s segment; the header
        that says so. The slot is ours again when the ticket completes."""
        slot = seg.slot(self.worker_id)
        for key, dst in slot.items():
            if part[key] is not dst:  # backward may have written into the slot itself
                np.copyto(dst, part[key])
        ticket.shared[i] = slot
        self._slot_busy[i] = ticket
        self.bytes_shared += sum(a.nbytes for a in slot.values())
        return encode_message(header, shared=True)

    def _attach(self, replies: dict[int, Message]) -> None:
        """Open the shared-memory segment each server's register reply offers, when it is
        on this host (``Segment.attach`` checks); None for the others."""
        for i, m in replies.items():
            lay = m.header.get("layout")
            old, self.segments[i] = self.segments[i], None
            if old is not None:
                old.close()
                self._views = set()  # those arrays are the old segment's: copy into them
            self._links.set_local(i, None)
            self._slot_busy.pop(i, None)  # a new segment: its slot is free
            if self.shared_memory and valid_layout(lay) and lay.get("shm") is not None:
                try:
                    shapes = [tuple(int(d) for d in s) for s in lay["shapes"]]
                except (TypeError, ValueError):
                    continue
                seg = Segment.attach(lay["shm"], lay["keys"], shapes,
                                     [DTYPES[d] for d in lay["dtypes"]])
                if seg is not None and self.worker_id >= seg.num_slots:
                    seg.close()  # no slot for this id: the server refuses it anyway
                    seg = None
                self.segments[i] = seg
                if seg is not None and lay["shm"].get("local") is True:
                    self._links.set_local(i, local.connect(seg.name))

    def shared_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
        """Every parameter's array in the servers' shared memory, and this worker's
        gradient slot arrays, as name -> array; None unless every parameter lies whole
        in an attached segment (same host, not split between servers).

        A sync worker can compute on them directly (``Parameter.data``/``.grad``):
        pushes then copy nothing in, pulls copy nothing out. That is safe because a
        sync server changes the parameters only after every live worker's push, and
        reads a slot only while it handles that worker's push; a worker that the
        server stopped waiting for may compute on changing parameters, and its next
        gradient is refused as stale."""
        lay = self._need_layout()
        params, grads = {}, {}
        for p in lay.plan.pieces:
            seg = self.segments[p.server]
            if seg is None or p.split:
                return None
            params[p.name] = seg.params()[p.key]
            grads[p.name] = seg.slot(self.worker_id)[p.key]
        self._views = {id(a) for a in params.values()}
        return params, grads

    def _param_buffers(self, i: int) -> Any:
        """For ``decode``: the layout and parameter entries of server ``i``'s segment."""
        def buffers(h: dict[str, Any]) -> tuple[dict[str, list], list[Entry]]:
            seg = self.segments[i]
            if seg is None:
                raise ProtocolError("parameters in shared memory, but no segment is attached")
            if h.get("seg") != seg.name:
                raise ProtocolError(f"a shared-memory reply names segment {h.get('seg')!r:.40}, "
                                    f"this worker has {seg.name}")
            return seg.layout, seg.entries()
        return buffers

    def _transmit(self, ticket: Ticket, i: int, *, resend: bool = False) -> None:
        """Send ``ticket``'s request to server ``i``: a header for a server on this host
        by the same-host channel (local.py), the rest by ZeroMQ. A server handles a
        worker's requests in the order they were made, so neither way may overtake a
        request still unanswered on the other: a ZeroMQ request waits (``_deferred``)
        until the channel's are answered, and the channel is not used while a ZeroMQ
        request is out. Resends go at once."""
        frames = ticket.frames[i]
        if self._send_local(ticket, i, frames):
            ticket.via[i] = "local"
        elif not resend and self._unanswered(i, "local", ticket):
            self._deferred[i].append(ticket)
            ticket.sent_gen[i] = -1
            return
        else:
            try:  # never block: with no usable connection (a failed handshake) a send would hang
                self._links.socks[i].send_multipart(frames, zmq.NOBLOCK, copy=False)
            except zmq.Again:  # not queued: the next retry or reconnection sends it
                ticket.sent_gen[i] = -1
                return
            ticket.via[i] = "zmq"
        ticket.sent_gen[i] = self._links.generation[i]
        self.bytes_sent += frames_nbytes(frames)
        if resend:
            ticket.resends += 1
            self.resends += 1

    def _send_local(self, ticket: Ticket, i: int, frames: list[Any]) -> bool:
        channel = self._links.local[i]
        if channel is None or ticket.op not in _LOCAL_OPS or len(frames) != 1 \
                or self._unanswered(i, "zmq", ticket):
            return False
        if channel.send(frames):
            return True
        if channel.closed:  # broken: ZeroMQ from now on
            self._channel_lost(i)
        return False

    def _unanswered(self, i: int, via: str, other: Ticket | None) -> bool:
        """Whether a request other than ``other`` went to server ``i`` by ``via`` and is
        not answered yet."""
        return any(t is not other and t.via.get(i) == via and i in t.servers
                   and i not in t.replies for t in self._open.values())

    def _channel_lost(self, i: int) -> None:
        """Server ``i``'s same-host channel closed: what it carried unanswered goes again
        by ZeroMQ (a server that had it answers ``duplicate``), then what waited for it."""
        self._links.set_local(i, None)
        for ticket in {id(t): t for t in self._open.values()}.values():
            if ticket.via.get(i) == "local" and i in ticket.servers and i not in ticket.replies:
                self._transmit(ticket, i, resend=True)
        self._flush_deferred(i)

    def _flush_deferred(self, i: int) -> None:
        if self._deferred[i] and not self._unanswered(i, "local", None):
            waiting, self._deferred[i] = self._deferred[i], []
            for ticket in waiting:
                if i not in ticket.replies:
                    self._transmit(ticket, i)

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
        self._await(ticket, self.timeout if timeout is None else timeout)
        return self._result(ticket)

    def _await(self, ticket: Ticket, limit: float) -> None:
        deadline = time.monotonic() + limit
        interval = self.retry_interval
        next_retry = time.monotonic() + interval
        while True:
            while len(ticket.replies) < len(ticket.servers):
                now = time.monotonic()
                if now >= deadline:
                    raise PSTimeoutError(self._timeout_text(ticket, limit))
                if now >= next_retry:  # no sign of life: resend, backing off
                    self.resend(ticket)
                    interval = min(2 * interval, self.retry_max_interval)
                    next_retry = now + interval
                wait_ms = max(1, int(1000 * (min(deadline, next_retry) - now)))
                for kind, i in self._links.poll(wait_ms):
                    if kind == "data":
                        self._drain(i)
                    elif kind == "local":
                        self._drain_local(i)
                    elif self._links.events(i):
                        self._resend_lost(i)
            if not self._register_again(ticket, deadline):
                break
        for seq in set(ticket.seqs.values()):
            self._open.pop(seq, None)
        for i in ticket.shared:
            if self._slot_busy.get(i) is ticket:
                del self._slot_busy[i]

    def _resend_lost(self, i: int) -> None:
        """Server ``i`` is reachable again: resend what it had not answered when the
        connection broke (what was queued after the break goes out by itself)."""
        gen = self._links.generation[i]
        for ticket in {id(t): t for t in self._open.values()}.values():
            if i in ticket.servers and i not in ticket.replies and ticket.sent_gen[i] < gen:
                self._transmit(ticket, i, resend=True)

    def _register_again(self, ticket: Ticket, deadline: float) -> bool:
        """Servers that answered ``unregistered`` (restarted without this worker, or
        gave it up as lost): register with them and resend under a new sequence number.
        True when something was resent (the caller waits again)."""
        shards = tuple(i for i, m in ticket.replies.items()
                       if m.header.get("code") == "unregistered")
        if not shards or ticket.op == "register" or ticket.reregistered:
            return False
        ticket.reregistered = True
        reg = self._send("register", self._empty(), servers=shards)
        self._await(reg, max(0.0, deadline - time.monotonic()))
        raise_errors(reg.op, reg.replies, self.addresses)
        self.reregistrations += 1
        self._attach(reg.replies)  # a restarted server has a new segment (or none)
        for i in shards:
            self._seq += 1
            header = msgpack.unpackb(ticket.frames[i][0], raw=False)
            header["seq"] = self._seq
            header.pop("seg", None)
            if self.segments[i] is not None:
                header["seg"] = self.segments[i].name
            if header.pop("shm", False):  # the gradient is in the old segment: send it as frames
                ticket.frames[i] = encode_message(header, dense_entries(ticket.shared.pop(i)))
            else:
                ticket.frames[i] = [msgpack.packb(header, use_bin_type=True),
                                    *ticket.frames[i][1:]]
            ticket.seqs[i] = self._seq
            self._open[self._seq] = ticket
            del ticket.replies[i]
            self._transmit(ticket, i)
        return True

    def _timeout_text(self, ticket: Ticket, limit: float) -> str:
        silent = [i for i in ticket.servers if i not in ticket.replies]
        names = ", ".join(f"{i} ({self.addresses[i]})" for i in silent)
        states = "; ".join(f"server {i}: {self._links.describe(i)}" for i in silent)
        return (f"no reply to {ticket.op} (seq {ticket.seq}) within {limit:g} s from "
                f"server(s) {names} [{states}; resent {ticket.resends} times]")

    def _drain(self, i: int) -> None:
        sock = self._links.socks[i]
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._take_reply(i, frames)

    def _drain_local(self, i: int) -> None:
        channel = self._links.local[i]
        messages = channel.receive() if channel is not None else None
        for raw in messages or ():
            self._take_reply(i, [raw])
        if messages is None or channel.closed:  # the server closed it (gone, restarting)
            self._channel_lost(i)

    def _take_reply(self, i: int, frames: list[Any]) -> None:
        """Decode one reply from server ``i`` and file it with its ticket."""
        try:
            msg = decode(frames, reply=True, limits=self.limits, shared=self._param_buffers(i))
        except ProtocolError as exc:
            raise PSError(f"server {i} ({self.addresses[i]}) sent a bad reply: {exc}") from None
        self.bytes_received += msg.nbytes
        seq = msg.header["seq"]
        ticket = self._open.get(seq)
        if ticket is None or i in ticket.replies or ticket.seqs.get(i) != seq:
            self.unmatched_replies += 1  # a late reply to a resent or abandoned request
            return
        ticket.replies[i] = msg
        self._flush_deferred(i)
        if msg.shared:
            self._copy_shared(ticket, i, msg)
        elif ticket.out is not None and len(ticket.servers) > 1 \
                and ticket.op in ("pull", "push_pull") \
                and scatter_reply(self._need_layout().plan, i, msg, ticket.out):
            ticket.copied.add(i)  # copied while the other shards' replies still arrive

    def _copy_shared(self, ticket: Ticket, i: int, msg: Message) -> None:
        """Copy parameters out of server ``i``'s segment at once (into ``out``, or into
        arrays of their own) and check that no update ran meanwhile."""
        plan = self._need_layout().plan
        out = ticket.out
        seg = self.segments[i]
        if out is not None and all(p.name in out for p in plan.server_pieces(i)):
            # arrays that are the segment's own (shared_arrays) need no copy
            todo = {n: a for n, a in out.items() if id(a) not in self._views}
            if todo:
                scatter_reply(plan, i, msg, todo)
            ticket.copied.add(i)
        else:
            msg.entries = [replace(e, payload=[p.copy() for p in e.payload]) for e in msg.entries]
        self.bytes_shared += seg.nbytes if seg is not None else 0
        if seg is None or seg.seq != msg.header["pseq"]:
            if self._slot_busy.get(i) is ticket:  # answered: the server is done with the slot
                del self._slot_busy[i]
            raise PSError(f"server {i} ({self.addresses[i]}) updated its parameters while this "
                          f"worker copied them out of shared memory (version "
                          f"{msg.header['ver']}): in sync mode it no longer waited for this "
                          "worker (dropped as lost?)", {i: "torn"})

    def _result(self, ticket: Ticket) -> Any:
        raise_errors(ticket.op, ticket.replies, self.addresses)
        replies = [ticket.replies[i] for i in ticket.servers]
        version = min(m.header["ver"] for m in replies)
        if ticket.op == "register":
            lay = layout_from(replies, version)
            self._attach(dict(zip(ticket.servers, replies, strict=True)))
            return lay
        if ticket.op in ("pull", "push_pull"):
            return version, gather_replies(self._need_layout().plan, replies, ticket.out,
                                           ticket.copied)
        if ticket.op == "push":
            return version
        if ticket.op == "clock":
            return min(int(m.header.get("min_clock", version)) for m in replies)
        if ticket.op == "stats":
            return [int_keys(m.header.get("stats", {})) for m in replies]
        return None
