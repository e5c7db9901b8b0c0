"""The parameter server: one ROUTER socket, one loop, parameters updated in place.

    server = ParameterServer({"w": w0}, optimizer="momentum", optimizer_config={"lr": 0.1},
                             mode="sync", num_workers=4, worker_timeout=10,
                             checkpoint_dir="ckpt", checkpoint_every=100)
    server.start_thread()        # or server.run() in its own process
    ... PSClient([server.address], worker_id) ...
    server.stop()

The loop receives a request, validates it fully (``protocol.decode`` then
``ServerState.decode``), and either answers at once or parks the reply as a
waiter (``consistency.py``); it never blocks on a worker, and sends without
blocking (a reply to a peer whose queue is full is dropped and counted; the
client resends). Replies carrying parameters send the live arrays with
``copy=False``; before the next in-place update the server waits briefly for
those sends, and gives the parameters fresh arrays if a slow reader still holds
them (``_wait_inflight``). The operations are in ``ops.py``.

Reliability (see RELIABILITY.md): bad messages get an error reply, are counted in
``rejected`` and change nothing; a worker silent for ``worker_timeout`` seconds is
dropped from every wait (or, with ``on_worker_loss="abort"``, ends the job);
checkpoints every ``checkpoint_every`` versions let ``resume`` carry on after a
crash; without CURVE keys (``security``) the server only listens locally.

Same host (``shm.py``): a sync-mode server without CURVE keys keeps its parameters
in a shared-memory segment with a gradient slot per worker; workers on its host
send and receive only headers (``shared_memory=False`` turns this off).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from distnet.ps import checkpoint as ckpt
from distnet.ps import local
from distnet.ps.auth import ServerKeys, ZapHandler, check_bind_address, server_keys
from distnet.ps.consistency import Consistency
from distnet.ps.group import serve_shards
from distnet.ps.ops import RequestError, ServerOps
from distnet.ps.protocol import (
    DEFAULT_LIMITS,
    Entry,
    Limits,
    ProtocolError,
    decode,
    dense_entries,
    encode,
    peek_fields,
)
from distnet.ps.shm import Segment
from distnet.ps.state import OptimizerSpec, ServerState
from distnet.ps.transport import (
    DEFAULT_OPTIONS,
    SocketOptions,
    bind_router,
    frames_nbytes,
    monitor,
    read_events,
    send_frames,
)

log = logging.getLogger("distnet.ps.server")
_BATCH = 64  # messages handled per poll when they queue up
_INFLIGHT_WAIT_S = 1.0  # how long an update waits for a parameter reply still being sent
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
LOSS_POLICIES = ("continue", "abort")


class StaleSegment(ProtocolError):
    """A gradient left in a segment this server does not have: the worker attached to a
    server that ran on this host before (a restart). ``unregistered`` makes it register
    again, attach the new segment, and resend the gradient as frames."""

    code = "unregistered"


class ParameterServer(ServerOps):
    """Holds one shard of the parameters and applies workers' gradients to it.

    params: key -> array (copied; the server owns its arrays). optimizer: a distnet
    optimizer name or a factory ``f(named_params, **optimizer_config)``. schedule:
    ``{"name", "total_steps", ...}`` for ``build_schedule`` (evaluated at the server
    version) or a callable. mode: "sync" (BSP, averaged), "async" (each push applied),
    "ssp" (async updates, clocks gated by ``staleness``). lr_staleness_scaling: in
    async mode scale the rate by ``1 / (1 + staleness)``. timeout: seconds any
    deferred reply may wait before it is answered with an error naming its cause.

    Reliability and security (all optional):
    worker_timeout: seconds without a message or heartbeat after which a registered
    worker is lost (None: never). on_worker_loss: "continue" (the others carry on)
    or "abort" (every request is then refused with a message naming the worker, and
    the loop ends ``worker_timeout`` seconds later). nonfinite: "reject" NaN/inf
    gradients or "clip" them (entries set to 0). checkpoint_dir / checkpoint_every
    (versions, 0 = only on stop) / checkpoint_keep / checkpoint_on_stop (default: when
    checkpoint_dir is set; covers SIGTERM, ``shutdown`` and ``stop()``). resume: a
    checkpoint file or directory to start from (its newest checkpoint of this shard),
    or True for "checkpoint_dir's newest if there is one". job_config: JSON-able
    settings stored in every checkpoint. security: ServerKeys or a keys directory
    (``distnet keygen``); without it only local addresses may be bound unless
    allow_insecure.
    """

    def __init__(self, params: dict[str, np.ndarray], *, optimizer: OptimizerSpec = "sgd",
                 optimizer_config: dict[str, Any] | None = None,
                 schedule: dict[str, Any] | Callable[[int], float] | None = None,
                 mode: str = "sync", num_workers: int = 1, staleness: int = 3,
                 lr_staleness_scaling: bool = False, bind: str = "tcp://127.0.0.1:0",
                 server_id: int = 0, timeout: float = 60.0, check_finite: bool = True,
                 socket_options: SocketOptions = DEFAULT_OPTIONS,
                 security: ServerKeys | str | Path | None = None,
                 limits: Limits = DEFAULT_LIMITS, worker_timeout: float | None = None,
                 on_worker_loss: str = "continue", nonfinite: str = "reject",
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 0,
                 checkpoint_keep: int = 2, checkpoint_on_stop: bool | None = None,
                 resume: str | Path | bool | None = None,
                 job_config: dict[str, Any] | None = None, allow_insecure: bool = False,
                 shared_memory: bool = True) -> None:
        if on_worker_loss not in LOSS_POLICIES:
            raise ValueError(f"on_worker_loss must be one of {LOSS_POLICIES}, "
                             f"got {on_worker_loss!r}")
        if worker_timeout is not None and worker_timeout <= 0:
            raise ValueError(f"worker_timeout must be > 0 seconds, got {worker_timeout}")
        keys = server_keys(security)
        check_bind_address(bind, secure=keys is not None, allow_insecure=allow_insecure)
        self.consistency = Consistency(mode, num_workers, staleness)
        self.state = ServerState(params, optimizer=optimizer, optimizer_config=optimizer_config,
                                 schedule=schedule, check_finite=check_finite,
                                 nonfinite=nonfinite)
        self.mode, self.server_id, self.timeout = mode, server_id, float(timeout)
        self.lr_staleness_scaling = lr_staleness_scaling
        self.limits = limits
        self.worker_timeout, self.on_worker_loss = worker_timeout, on_worker_loss
        self.job_config = job_config
        self.counters: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.staleness_hist: Counter[int] = Counter()
        self.last_error = ""
        self.abort_reason: str | None = None
        self._abort_at = 0.0
        self.checkpoints = ckpt.Checkpointer(checkpoint_dir, checkpoint_every, checkpoint_keep,
                                             checkpoint_on_stop, resume)
        self.checkpoints.resume(self)
        # sync only: there a round's update never overlaps a worker's copy (see shm.py);
        # a secured server's data must not bypass its encryption
        self.segment = (Segment.create(self.state.arrays, num_workers)
                        if shared_memory and mode == "sync" and keys is None and self.state.arrays
                        else None)
        if self.segment is not None:
            self.state.relocate(self.segment.params())
            self.state.segment = self.segment
        # the segment's workers send their headers over a channel of their own (local.py)
        self.local = local.listen(self.segment.name) if self.segment is not None else None
        self.local_peers: list[local.LocalPeer] = []
        self._zmq_ids: dict[int, bytes] = {}  # wid -> the ZeroMQ address it registered from
        self._params_entries = dense_entries(self.state.arrays)  # live arrays: built once
        self._inflight: list[zmq.MessageTracker] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ran = False
        # a secured server gets a context of its own: ZeroMQ allows one ZAP handler per
        # context, and its key list must not apply to other servers in this process
        self._context = zmq.Context() if keys is not None else None
        self._zap = ZapHandler(self._context, keys.allowed) if keys is not None else None
        try:
            self._sock, self.address = bind_router(
                bind, options=self._socket_options(socket_options), security=keys,
                context=self._context)
            self._monitor = monitor(self._sock, _HANDSHAKE_FAILED)
        except BaseException:
            self._close_sockets(linger=0)
            raise

    def _socket_options(self, options: SocketOptions) -> SocketOptions:
        """ZMQ_MAXMSGSIZE no larger than the largest frame a valid request can have, so
        ZeroMQ drops an oversized one before it is ever buffered whole."""
        biggest = max((max(a.nbytes, 8 * a.size) for a in self.state.arrays.values()), default=0)
        cap = max(self.limits.max_header_bytes, biggest) + 1024
        size = options.max_message_bytes
        return replace(options, max_message_bytes=cap if size < 0 else min(size, cap))

    # ---- running ----------------------------------------------------------------------
    def run(self, *, handle_signals: bool = True) -> None:
        """Serve until ``shutdown``, ``stop()``, SIGTERM (main thread, when no handler is
        installed yet) or an abort; writes the stop checkpoint and closes the sockets.
        The loop is ``group.serve_shards``, which serves several shards alike."""
        serve_shards([self], handle_signals=handle_signals)

    def _finish(self) -> None:
        if self.checkpoints.on_stop:
            self.save_checkpoint()
        self._close_sockets()  # LINGER lets the last replies (shutdown's) go out

    def _close_sockets(self, linger: int | None = None) -> None:
        if getattr(self, "segment", None) is not None:
            self.segment.close()
        if getattr(self, "local", None) is not None:
            for peer in self.local_peers:
                peer.close()
            self.local.close()
        if getattr(self, "_sock", None) is not None:
            if getattr(self, "_monitor", None) is not None:
                self._sock.disable_monitor()
                self._monitor.close(linger=0)
            self._sock.close(linger=linger)
        stopped = self._zap is None or self._zap.stop()
        if self._context is not None and stopped:  # term() would wait for the ZAP socket
            self._context.term()

    def bind_local(self) -> str | None:
        """Also listen on an ``inproc://`` endpoint, for a worker in this process (a server
        co-located with a worker, ``--colocate``): its requests and replies then pass by
        reference, with no copy, no system call and no I/O thread. Returns the endpoint,
        or None for a secured server, whose socket lives in a private context that no
        other socket shares (its co-located worker connects over TCP like the others)."""
        if self._context is not None:
            return None
        endpoint = f"inproc://distnet-ps-{self.server_id}-{id(self):x}"
        self._sock.bind(endpoint)
        return endpoint

    def start_thread(self) -> threading.Thread:
        """Run the loop in a daemon thread (tests, single-process demos)."""
        self._ran = True  # before the thread starts: stop() must not close its socket
        self._thread = threading.Thread(target=self.run, name=f"ps-server-{self.server_id}",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, join_timeout: float = 5.0, *, checkpoint: bool | None = None) -> None:
        """Ask the loop to end (within ~50 ms) and join its thread if it has one.
        checkpoint: write the stop checkpoint or not (default: ``checkpoint_on_stop``)."""
        if checkpoint is not None:
            self.checkpoints.on_stop = checkpoint and self.checkpoint_dir is not None
        self._stop.set()
        if not self._ran:  # never served: nobody else will close the socket
            self._close_sockets(linger=0)
        elif self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(join_timeout)

    # ---- checkpoints ------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path | None:
        return self.checkpoints.directory

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint now (into checkpoint_dir); its path, or None on failure."""
        return self.checkpoints.save(self)

    def _after_update(self) -> None:
        self.checkpoints.after_update(self)

    # ---- receiving --------------------------------------------------------------------
    def _receive(self) -> None:
        for _ in range(_BATCH):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(frames)

    def _receive_local(self, peer: local.LocalPeer) -> None:
        """Handle what a same-host channel has brought (it closes itself at the end)."""
        for raw in peer.receive() or ():
            self.counters["local_requests"] += 1
            self._handle_safely(peer, [raw], len(raw))

    def _forget(self, peer: local.LocalPeer) -> None:
        """A closed channel: its parked requests are answered by ZeroMQ instead."""
        if peer in self.local_peers:
            self.local_peers.remove(peer)

    def _handle(self, frames: list[zmq.Frame]) -> None:
        self._handle_safely(frames[0].bytes, frames[1:], frames_nbytes(frames))

    def _handle_safely(self, identity: bytes | local.LocalPeer, body: list[Any],
                       nbytes: int) -> None:
        try:
            self._handle_message(identity, body, nbytes)
        except Exception:  # a bug must cost one request, never the server
            self.counters["internal_errors"] += 1
            log.exception("server %d: unexpected error handling a message", self.server_id)

    def _handle_message(self, identity: bytes | local.LocalPeer, body: list[Any],
                        nbytes: int) -> None:
        """One request from ``identity``: a ZeroMQ routing id, or a same-host channel."""
        self.counters["bytes_in"] += nbytes
        try:
            msg = decode(body, limits=self.limits, shared=self._slot_buffers)
        except ProtocolError as exc:
            self._reject(identity, peek_fields(body), str(exc), getattr(exc, "code", "bad_message"))
            return
        h = msg.header
        op, wid = h["op"], h["wid"]
        self.requests[op] += 1
        try:
            if op != "stats":
                self._check_worker(wid)
                self.consistency.last_seen[wid] = time.monotonic()
            if self.abort_reason is not None and op not in ("stats", "ping", "shutdown"):
                raise RequestError(self.abort_reason, "aborted")
            if op not in ("register", "stats", "ping") \
                    and wid not in self.consistency.registered:
                raise RequestError(f"worker {wid} is not registered (call register first)",
                                   "unregistered")
            getattr(self, "_op_" + op)(identity, msg)
        except (ProtocolError, RequestError) as exc:
            self._reject(identity, h, str(exc), getattr(exc, "code", "bad_message"))
        except Exception as exc:  # a bug or an optimizer failure: report it, keep serving
            self.counters["internal_errors"] += 1
            log.exception("server %d: %s from worker %s failed", self.server_id, op, wid)
            self._reject(identity, h, f"internal error: {type(exc).__name__}: {exc}", "internal")

    def _slot_buffers(self, h: dict[str, Any]) -> tuple[dict[str, list], list[Entry]]:
        """The layout and entries of a gradient that a worker left in its slot."""
        seg, op, wid = self.segment, h.get("op"), h.get("wid")
        if seg is None:
            raise ProtocolError("this server has no shared-memory segment: send the arrays "
                                "as frames")
        if op not in ("push", "push_pull"):
            raise ProtocolError(f"{op!r:.20} carries no arrays in shared memory")
        if type(wid) is not int or not 0 <= wid < seg.num_slots:
            raise ProtocolError(f"worker id {wid!r:.20} has no shared-memory slot "
                                f"(0..{seg.num_slots - 1})")
        if h.get("seg") != seg.name:  # written for a server that ran here before a restart
            raise StaleSegment(f"worker {wid}'s gradient is in segment {h.get('seg')!r:.40}, "
                               f"not this server's ({seg.name}): register again")
        self.counters["shm_gradients"] += 1
        return seg.layout, seg.entries(wid)

    def _check_worker(self, wid: int) -> None:
        n = self.consistency.num_workers
        if wid >= n:
            raise RequestError(f"worker id {wid} out of range: this server expects {n} workers "
                               f"(0..{n - 1})")

    def _note_handshakes(self) -> None:
        for event, _ in read_events(self._monitor):
            if event & _HANDSHAKE_FAILED:
                self.counters["handshakes_failed"] += 1

    # ---- sending ----------------------------------------------------------------------
    def _header(self, h: dict[str, Any], status: str = "ok", message: str = "",
                **extra: Any) -> dict[str, Any]:
        return {"op": h.get("op", "error"), "wid": h.get("wid", 0), "seq": h.get("seq", 0),
                "ver": self.state.version, "status": status, "message": message,
                "server": self.server_id, **extra}

    def _reply(self, identity: bytes, h: dict[str, Any], **extra: Any) -> None:
        self._send(identity, self._header(h, **extra))

    def _reply_params(self, identity: bytes, h: dict[str, Any], **extra: Any) -> None:
        since = h.get("since")
        if since is not None and self.state.version <= since:
            self._send(identity, self._header(h, not_modified=True, **extra))
        elif self.state.segment is not None and h.get("seg") == self.state.segment.name:
            # the worker copies them out of the segment; pseq lets it check that no
            # update ran meanwhile
            self.counters["shm_replies"] += 1
            seg = self.state.segment
            self._send(identity, self._header(h, pseq=seg.seq, seg=seg.name, **extra),
                       shared=True)
        else:
            self._send(identity, self._header(h, **extra), self._params_entries, track=True)

    def _reject(self, identity: bytes, h: dict[str, Any], text: str, code: str) -> None:
        self.counters["rejected"] += 1
        self.last_error = text
        log.info("server %d rejected %s from worker %s: %s", self.server_id, h.get("op"),
                 h.get("wid"), text)
        self._send(identity, self._header(h, "error", text, code=code))

    def _send(self, identity: bytes | local.LocalPeer, header: dict[str, Any],
              entries: list = (), track: bool = False, shared: bool = False) -> None:
        self.state.answering(header["wid"])  # a slot the round holds is its worker's again
        body = encode(header, entries, shared=shared)
        if isinstance(identity, local.LocalPeer):
            if identity.send(body):
                self.counters["bytes_out"] += len(body[0])
                return
            # array frames, or a broken channel: by ZeroMQ, to where the worker registered from
            identity = self._zmq_ids.get(header["wid"], b"")
            if not identity:
                self.counters["replies_dropped"] += 1
                return
        frames = [identity, *body]
        try:  # never block the loop on one peer: a full queue drops the reply (it resends)
            tracker = send_frames(self._sock, frames, track=track, noblock=True)
        except zmq.ZMQError as exc:  # the peer left (EHOSTUNREACH) or its pipe is full
            self.counters["replies_dropped"] += 1
            log.info("server %d: reply %s to worker %s dropped: %s", self.server_id,
                     header["op"], header["wid"], exc)
            return
        self.counters["bytes_out"] += frames_nbytes(frames)
        if tracker is not None:
            self._inflight = [t for t in self._inflight if not t.done]
            self._inflight.append(tracker)

    def _wait_inflight(self) -> None:
        """Before an in-place update: wait (briefly) until ZeroMQ has sent every parameter
        buffer it was given; a reply still queued for a slow peer keeps the old arrays and
        the parameters move to fresh ones, so no peer can stall the updates."""
        deadline = time.monotonic() + min(self.timeout, _INFLIGHT_WAIT_S)
        for t in self._inflight:
            try:
                t.wait(max(0.0, deadline - time.monotonic()))
            except zmq.NotDone:
                self.counters["slow_readers"] += 1
                if self.state.segment is not None:
                    log.info("server %d: a slow reader; parameters leave shared memory",
                             self.server_id)
                self.state.detach()
                self._params_entries = dense_entries(self.state.arrays)
                break
        self._inflight.clear()
