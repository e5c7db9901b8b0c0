"""The parameter server: one ROUTER socket, one loop, parameters updated in place.

    server = ParameterServer({"w": w0}, optimizer="momentum", optimizer_config={"lr": 0.1},
                             mode="sync", num_workers=4)
    server.start_thread()        # or server.run() in its own process
    ... PSClient([server.address], worker_id) ...
    server.stop()

The loop receives a request, validates it fully (``protocol.decode`` then
``ServerState.decode``), and either answers at once or parks the reply as a
waiter (``consistency.py``); it never blocks on a worker. Replies carrying
parameters send the live arrays with ``copy=False``: ZeroMQ may still be reading
them when the loop moves on, so before the next in-place update the server waits
for those sends to finish (``_wait_inflight``), which is normally instantaneous.

Bad messages get an error reply, are counted in ``rejected`` and change nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from distnet.ps.consistency import Consistency, Waiter
from distnet.ps.protocol import (
    DEFAULT_LIMITS,
    Limits,
    Message,
    ProtocolError,
    decode,
    dense_entries,
    encode,
    peek_fields,
)
from distnet.ps.state import OptimizerSpec, ServerState
from distnet.ps.transport import (
    DEFAULT_OPTIONS,
    SocketOptions,
    bind_router,
    frames_nbytes,
    recv_frames,
    send_frames,
)

log = logging.getLogger("distnet.ps.server")
_POLL_S = 0.05  # how often an idle loop looks at stop() and deadlines


class RequestError(Exception):
    """A well-formed request that cannot be honoured (unregistered, stale, ...)."""


class ParameterServer:
    """Holds one shard of the parameters and applies workers' gradients to it.

    params: key -> array (copied; the server owns its arrays). optimizer: a distnet
    optimizer name or a factory ``f(named_params, **optimizer_config)``. schedule:
    ``{"name", "total_steps", ...}`` for ``build_schedule`` (evaluated at the server
    version) or a callable. mode: "sync" (BSP, averaged), "async" (each push applied),
    "ssp" (async updates, clocks gated by ``staleness``). lr_staleness_scaling: in
    async mode scale the rate by ``1 / (1 + staleness)``. timeout: seconds any
    deferred reply may wait before it is answered with an error naming its cause.
    """

    def __init__(self, params: dict[str, np.ndarray], *, optimizer: OptimizerSpec = "sgd",
                 optimizer_config: dict[str, Any] | None = None,
                 schedule: dict[str, Any] | Callable[[int], float] | None = None,
                 mode: str = "sync", num_workers: int = 1, staleness: int = 3,
                 lr_staleness_scaling: bool = False, bind: str = "tcp://127.0.0.1:0",
                 server_id: int = 0, timeout: float = 60.0, check_finite: bool = True,
                 socket_options: SocketOptions = DEFAULT_OPTIONS, security: Any = None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.consistency = Consistency(mode, num_workers, staleness)
        self.state = ServerState(params, optimizer=optimizer, optimizer_config=optimizer_config,
                                 schedule=schedule, check_finite=check_finite)
        self.mode, self.server_id, self.timeout = mode, server_id, float(timeout)
        self.lr_staleness_scaling = lr_staleness_scaling
        self.limits = limits
        self.counters: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.staleness_hist: Counter[int] = Counter()
        self.last_error = ""
        self._params_entries = dense_entries(self.state.arrays)  # live arrays: built once
        self._inflight: list[zmq.MessageTracker] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ran = False
        self._sock, self.address = bind_router(bind, options=socket_options, security=security)

    # ---- running ----------------------------------------------------------------------
    def run(self) -> None:
        """Serve until a ``shutdown`` request or ``stop()``; closes the socket on exit."""
        self._ran = True
        try:
            while not self._stop.is_set():
                deadline = self.consistency.next_deadline()
                wait = _POLL_S if deadline is None else min(
                    _POLL_S, max(0.0, deadline - time.monotonic()))
                frames = recv_frames(self._sock, wait)
                if frames is not None:
                    self._handle(frames)
                self._expire(time.monotonic())
        finally:
            self._sock.close()  # LINGER lets the last replies (shutdown's) go out

    def start_thread(self) -> threading.Thread:
        """Run the loop in a daemon thread (tests, single-process demos)."""
        self._ran = True  # before the thread starts: stop() must not close its socket
        self._thread = threading.Thread(target=self.run, name=f"ps-server-{self.server_id}",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, join_timeout: float = 5.0) -> None:
        """Ask the loop to end (within ~50 ms) and join its thread if it has one."""
        self._stop.set()
        if not self._ran:  # never served: nobody else will close the socket
            self._sock.close(linger=0)
        elif self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(join_timeout)

    # ---- receiving --------------------------------------------------------------------
    def _handle(self, frames: list[zmq.Frame]) -> None:
        identity, body = frames[0].bytes, frames[1:]
        self.counters["bytes_in"] += frames_nbytes(frames)
        try:
            msg = decode(body, limits=self.limits)
        except ProtocolError as exc:
            self._reject(identity, peek_fields(body), str(exc))
            return
        h = msg.header
        self.requests[h["op"]] += 1
        try:
            if h["op"] not in ("register", "stats", "shutdown"):
                self._check_worker(h["wid"], registered=True)
            getattr(self, "_op_" + h["op"])(identity, msg)
        except (ProtocolError, RequestError) as exc:
            self._reject(identity, h, str(exc))
        except Exception as exc:  # a bug or an optimizer failure: report it, keep serving
            log.exception("server %d: %s from worker %s failed", self.server_id, h["op"], h["wid"])
            self._reject(identity, h, f"internal error: {type(exc).__name__}: {exc}")

    def _check_worker(self, wid: int, *, registered: bool) -> None:
        c = self.consistency
        if wid >= c.num_workers:
            raise RequestError(f"worker id {wid} out of range: this server expects "
                               f"{c.num_workers} workers (0..{c.num_workers - 1})")
        if registered and wid not in c.registered:
            raise RequestError(f"worker {wid} is not registered (call register first)")

    # ---- operations -------------------------------------------------------------------
    def _op_register(self, identity: bytes, msg: Message) -> None:
        h = msg.header
        self._check_worker(h["wid"], registered=False)
        self.consistency.registered.add(h["wid"])
        self.consistency.last_seq[h["wid"]] = h["seq"]  # a new session: older seqs are stale
        c = self.consistency
        layout = {**self.state.layout(), "mode": self.mode, "num_workers": c.num_workers,
                  "staleness": c.bound or 0, "server_id": self.server_id}
        self._reply(identity, h, layout=layout)

    def _op_push(self, identity: bytes, msg: Message) -> None:
        self._gradient(identity, msg, want_params=False)

    def _op_push_pull(self, identity: bytes, msg: Message) -> None:
        self._gradient(identity, msg, want_params=True)

    def _gradient(self, identity: bytes, msg: Message, *, want_params: bool) -> None:
        h, c, st = msg.header, self.consistency, self.state
        wid, seq, ver = h["wid"], h["seq"], h["ver"]
        if seq <= c.last_seq.get(wid, -1):  # a resend: acknowledge, never apply twice
            self.counters["duplicates"] += 1
            if want_params and c.round.get(wid) == seq:  # its round is still open: wait again
                self._park(identity, h, "step", st.version + 1)
            elif want_params:
                self._reply_params(identity, h, duplicate=True)
            else:
                self._reply(identity, h, duplicate=True)
            return
        if ver > st.version:
            raise RequestError(f"gradient computed on version {ver}, server is at {st.version}")
        if self.mode == "sync":
            if ver != st.version:
                raise RequestError(f"stale gradient: computed on version {ver}, server is at "
                                   f"{st.version} (sync mode needs the current version)")
            if wid in c.round:
                raise RequestError(f"worker {wid} already pushed for version {st.version}")
        grads, views = st.decode(msg)  # validates everything; raises before any change
        if self.mode != "sync" or c.live <= {*c.round, wid}:
            self._wait_inflight()  # the update below rewrites arrays a reply may still read
        self.counters["gradients_received"] += 1
        c.last_seq[wid] = seq
        if self.mode == "sync":
            st.accumulate(grads, views)
            c.round[wid] = seq
            if want_params:
                self._park(identity, h, "step", st.version + 1)
            else:
                self._reply(identity, h, accepted=True)
            if c.round_complete():
                self.counters["pushes_applied"] += st.apply_accumulated()
                c.round.clear()
                self._release()
            return
        staleness = st.version - ver
        self.staleness_hist[staleness] += 1
        scale = 1.0 / (1 + staleness) if self.lr_staleness_scaling and self.mode == "async" else 1.0
        st.apply(grads, scale)
        self.counters["pushes_applied"] += 1
        if want_params:
            self._reply_params(identity, h, staleness=staleness)
        else:
            self._reply(identity, h, staleness=staleness)

    def _op_pull(self, identity: bytes, msg: Message) -> None:
        h, c = msg.header, self.consistency
        if self.mode == "ssp":
            clock = c.clocks[h["wid"]]
            if not c.clock_ready(clock):
                self._park(identity, h, "clock", clock)
                return
            self._reply_params(identity, h, min_clock=c.note_clock_reply(clock))
            return
        self._reply_params(identity, h)

    def _op_clock(self, identity: bytes, msg: Message) -> None:
        h, c = msg.header, self.consistency
        wid, clock = h["wid"], h["ver"]
        if clock < c.clocks[wid]:
            raise RequestError(f"worker {wid}: clock {clock} is behind its clock {c.clocks[wid]}")
        c.clocks[wid] = clock
        self._release()  # this worker may have been the slowest
        if c.clock_ready(clock):
            self._reply(identity, h, min_clock=c.note_clock_reply(clock))
        else:
            self._park(identity, h, "clock", clock)

    def _op_barrier(self, identity: bytes, msg: Message) -> None:
        generation = self.consistency.arrive_at_barrier(msg.header["wid"])
        self._park(identity, msg.header, "barrier", generation)
        self._release()

    def _op_stats(self, identity: bytes, msg: Message) -> None:
        self._reply(identity, msg.header, stats=self.stats())

    def _op_shutdown(self, identity: bytes, msg: Message) -> None:
        self._reply(identity, msg.header)
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        """Counters (msgpack-able: map keys are strings)."""
        c, st = self.consistency, self.state
        return {
            "server_id": self.server_id, "mode": self.mode, "version": st.version,
            "lr": st.current_lr(), "num_workers": c.num_workers,
            "registered": sorted(c.registered), "live": sorted(c.live),
            "clocks": {str(w): v for w, v in sorted(c.clocks.items())},
            "min_clock": c.min_clock(), "max_clock_gap": c.max_clock_gap,
            "staleness_hist": {str(s): n for s, n in sorted(self.staleness_hist.items())},
            "requests": dict(self.requests), "pending_replies": len(c.waiters),
            "param_bytes": st.nbytes(), "last_error": self.last_error,
            "update_seconds": st.update_seconds,
            **{k: self.counters[k] for k in (
                "pushes_applied", "gradients_received", "duplicates", "rejected", "timeouts",
                "replies_dropped", "bytes_in", "bytes_out")},
        }

    # ---- deferred replies ----------------------------------------------------------------
    def _park(self, identity: bytes, h: dict[str, Any], kind: str, target: int) -> None:
        self.consistency.waiters.append(Waiter(
            identity, h["op"], h["wid"], h["seq"], kind, target,
            time.monotonic() + self.timeout, h.get("since")))

    def _release(self) -> None:
        """Answer every waiter whose condition now holds."""
        c = self.consistency
        for w in c.take_ready(self.state.version):
            h = {"op": w.op, "wid": w.wid, "seq": w.seq, "since": w.since}
            extra = {"min_clock": c.note_clock_reply(w.target)} if w.kind == "clock" else {}
            if w.op in ("pull", "push_pull"):
                self._reply_params(w.identity, h, **extra)
            else:
                self._reply(w.identity, h, **extra)

    def _expire(self, now: float) -> None:
        c = self.consistency
        for w in c.take_expired(now):
            self.counters["timeouts"] += 1
            text = (f"timed out after {self.timeout:g} s waiting for "
                    f"{c.describe_wait(w, self.state.version)}")
            self._send(w.identity, self._header({"op": w.op, "wid": w.wid, "seq": w.seq},
                                                "error", text))

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
        else:
            self._send(identity, self._header(h, **extra), self._params_entries, track=True)

    def _reject(self, identity: bytes, h: dict[str, Any], text: str) -> None:
        self.counters["rejected"] += 1
        self.last_error = text
        log.info("server %d rejected %s from worker %s: %s", self.server_id, h.get("op"),
                 h.get("wid"), text)
        self._send(identity, self._header(h, "error", text))

    def _send(self, identity: bytes, header: dict[str, Any], entries: list = (),
              track: bool = False) -> None:
        frames = [identity, *encode(header, entries)]
        try:
            tracker = send_frames(self._sock, frames, track=track)
        except zmq.ZMQError as exc:  # the peer left (EHOSTUNREACH) or its pipe is full
            self.counters["replies_dropped"] += 1
            log.warning("server %d: reply %s to worker %s dropped: %s", self.server_id,
                        header["op"], header["wid"], exc)
            return
        self.counters["bytes_out"] += frames_nbytes(frames)
        if tracker is not None:
            self._inflight = [t for t in self._inflight if not t.done]
            self._inflight.append(tracker)

    def _wait_inflight(self) -> None:
        """Block until ZeroMQ has sent every parameter buffer it was given."""
        for t in self._inflight:
            try:
                t.wait(self.timeout)
            except zmq.NotDone:
                raise RequestError(
                    f"parameters cannot be updated: a reply sent {self.timeout:g} s ago is "
                    "still being transmitted (a stalled worker?)") from None
        self._inflight.clear()
