"""What the server does: the ``_op_<name>`` methods of ParameterServer, worker loss, stats.

A mixin so ``server.py`` keeps the loop, the sockets and the sending, and this file
holds the operations of docs/protocol.md. Every check that can fail runs before
the first change to the state, so a refused request changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from distnet.ps.consistency import Waiter
from distnet.ps.protocol import Message

log = logging.getLogger("distnet.ps.server")


class RequestError(Exception):
    """A well-formed request that cannot be honoured (unregistered, stale, ...).

    code: a word for clients to act on (``unregistered`` makes a client register
    again; ``aborted`` means the job is over), sent as the reply's ``code`` field.
    """

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class ServerOps:
    """The operations; mixed into ParameterServer, whose attributes they use."""

    # provided by ParameterServer
    consistency: Any
    state: Any
    counters: Any
    staleness_hist: Any
    mode: str
    server_id: int
    timeout: float
    lr_staleness_scaling: bool
    checkpoints: Any
    segment: Any
    local: Any
    local_peers: list[Any]
    _zmq_ids: dict[int, bytes]
    worker_timeout: float | None
    on_worker_loss: str
    abort_reason: str | None
    _abort_at: float
    _zap: Any
    _stop: Any
    _reply: Callable[..., None]
    _reply_params: Callable[..., None]
    _wait_inflight: Callable[[], None]
    _after_update: Callable[[], None]
    _send: Callable[..., None]
    _header: Callable[..., dict[str, Any]]

    def _op_register(self, identity: bytes, msg: Message) -> None:
        h, c = msg.header, self.consistency
        if c.register(h["wid"], h["seq"], time.monotonic()):
            self.counters["rejoins"] += 1
        layout = {**self.state.layout(), "mode": self.mode, "num_workers": c.num_workers,
                  "staleness": c.bound or 0, "server_id": self.server_id}
        if isinstance(identity, bytes):  # replies that cannot take the local channel go here
            self._zmq_ids[h["wid"]] = identity
        if self.segment is not None:  # a worker on this host finds it and uses it
            layout["shm"] = {**self.segment.info(), "local": self.local is not None}
        self._reply(identity, h, layout=layout)

    def _op_ping(self, identity: bytes, msg: Message) -> None:
        # the heartbeat of a client: _handle has already noted that the worker is alive
        wid = msg.header["wid"]
        self._reply(identity, msg.header, registered=wid in self.consistency.registered)

    def _op_push(self, identity: bytes, msg: Message) -> None:
        self._gradient(identity, msg, want_params=False)

    def _op_push_pull(self, identity: bytes, msg: Message) -> None:
        self._gradient(identity, msg, want_params=True)

    def _gradient(self, identity: bytes, msg: Message, *, want_params: bool) -> None:
        h, c, st = msg.header, self.consistency, self.state
        wid, seq, ver = h["wid"], h["seq"], h["ver"]
        if seq <= c.last_seq.get(wid, -1):  # a resend: acknowledge, never apply twice
            self._duplicate(identity, h, want_params)
            return
        if st.version < ver <= self.checkpoints.horizon:
            # computed on a version this server reached before it crashed and was resumed
            # from an older checkpoint: those updates are lost, the gradient is still good
            ver = st.version
            self.counters["recovered"] += 1
        if ver > st.version:
            raise RequestError(f"gradient computed on version {ver}, server is at {st.version}")
        if self.mode == "sync":
            if ver != st.version:
                raise RequestError(f"stale gradient: computed on version {ver}, server is at "
                                   f"{st.version} (sync mode needs the current version)")
            if wid in c.round and c.round[wid] > c.session.get(wid, -1):
                raise RequestError(f"worker {wid} already pushed for version {st.version}")
        grads, views = st.decode(msg)  # validates everything; raises before any change
        self.counters["gradients_received"] += 1
        c.last_seq[wid] = seq
        if self.mode == "sync":
            if wid in c.round:  # its previous session's gradient is in this round already
                self.counters["duplicates"] += 1
            else:
                st.accumulate(grads, views, wid, slot=msg.shared)
            c.round[wid] = seq
            if want_params:
                self._park(identity, h, "step", st.version + 1)
            else:
                self._reply(identity, h, accepted=True)
            self._complete_round()
            return
        self._wait_inflight()
        staleness = st.version - ver
        self.staleness_hist[staleness] += 1
        scale = 1.0 / (1 + staleness) if self.lr_staleness_scaling and self.mode == "async" else 1.0
        st.apply(grads, scale)
        self.counters["pushes_applied"] += 1
        if want_params:
            self._reply_params(identity, h, staleness=staleness)
        else:
            self._reply(identity, h, staleness=staleness)
        self._after_update()

    def _duplicate(self, identity: bytes, h: dict[str, Any], want_params: bool) -> None:
        c, st = self.consistency, self.state
        self.counters["duplicates"] += 1
        if want_params and c.round.get(h["wid"]) == h["seq"]:  # its round is open: wait again
            self._park(identity, h, "step", st.version + 1)
        elif want_params:
            self._reply_params(identity, h, duplicate=True)
        else:
            self._reply(identity, h, duplicate=True)

    def _complete_round(self) -> None:
        """Sync: apply the round's mean once every live worker has pushed."""
        c, st = self.consistency, self.state
        if self.mode != "sync":
            return
        if not c.round_complete():
            if st.accumulated:  # start on the step while the others compute
                st.prepare_round(c.live - set(c.round))
            return
        if st.accumulated:
            self._wait_inflight()
            self.counters["pushes_applied"] += st.apply_accumulated()
            c.round.clear()
            self._release()
            self._after_update()
        else:  # only gradients of earlier sessions' rounds (already applied): nothing to do
            c.round.clear()

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
        h = msg.header
        generation = self.consistency.arrive_at_barrier(h["wid"], h["seq"])
        self._park(identity, h, "barrier", generation)
        self._release()

    def _op_stats(self, identity: bytes, msg: Message) -> None:
        self._reply(identity, msg.header, stats=self.stats())

    def _op_shutdown(self, identity: bytes, msg: Message) -> None:
        self._reply(identity, msg.header)
        self._stop.set()

    # ---- deferred replies ----------------------------------------------------------------
    def _park(self, identity: bytes, h: dict[str, Any], kind: str, target: int) -> None:
        self.consistency.park(Waiter(identity, h["op"], h["wid"], h["seq"], kind, target,
                                     time.monotonic() + self.timeout, h.get("since"),
                                     h.get("seg")))

    def _release(self) -> None:
        """Answer every waiter whose condition now holds."""
        c = self.consistency
        # the latest to arrive first: in a sync round that is the straggler (typically the
        # worker on the farthest link), whose next push the next round waits for
        for w in reversed(c.take_ready(self.state.version)):
            h = {"op": w.op, "wid": w.wid, "seq": w.seq, "since": w.since, "seg": w.seg}
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
            self._send(w.identity, self._header(vars(w), "error", text, code="timeout"))

    # ---- liveness ---------------------------------------------------------------------
    def _check_liveness(self, now: float) -> None:
        if self.worker_timeout is None or self.abort_reason is not None:
            return
        for wid in self.consistency.silent(now, self.worker_timeout):
            silent_s = now - self.consistency.last_seen[wid]
            self._lose(wid, f"worker {wid} lost: no message or heartbeat for {silent_s:.1f} s "
                            f"(worker_timeout {self.worker_timeout:g} s)")

    def _lose(self, wid: int, reason: str) -> None:
        c = self.consistency
        self.counters["workers_lost"] += 1
        log.warning("server %d: %s; its data shard %d is lost", self.server_id, reason, wid)
        for w in c.lose(wid, reason, self.state.version):
            self._send(w.identity, self._header(vars(w), "error", reason, code="unregistered"))
        if self.on_worker_loss == "abort":
            self.abort_reason = f"job aborted: {reason}"
            self._abort_at = time.monotonic() + self.worker_timeout
            for w in c.waiters:
                self._send(w.identity, self._header(vars(w), "error", self.abort_reason,
                                                    code="aborted"))
            c.waiters.clear()
            return
        self._complete_round()  # the round may have waited only for the lost worker
        self._release()

    # ---- stats ------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters (msgpack-able: map keys are strings)."""
        c, st = self.consistency, self.state
        zap = self._zap
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
                "replies_dropped", "bytes_in", "bytes_out", "shm_gradients", "shm_replies",
                "local_requests",
                "internal_errors", "workers_lost",
                "rejoins", "recovered", "slow_readers", "handshakes_failed",
                "checkpoints_written", "checkpoint_errors")},
            # a lost worker's data shard (shard i of the data belongs to worker i) is lost too
            "lost_workers": sorted(c.lost), "lost_shards": sorted(c.lost),
            "lost": {str(w): info for w, info in sorted(c.lost.items())},
            "aborted": self.abort_reason or "",
            "nonfinite": st.nonfinite_gradients, "nonfinite_entries_zeroed": st.nonfinite_entries,
            "nonfinite_policy": st.nonfinite if st.check_finite else "unchecked",
            "shared_memory": self.segment.name if self.segment is not None else "",
            "shm_params": st.segment is not None,
            "local_channels": len(self.local_peers),
            "local_refused": self.local.refused if self.local is not None else 0,
            "secure": zap is not None, "auth_accepted": zap.accepted if zap else 0,
            "auth_refused": zap.refused if zap else 0,
            "last_checkpoint": self.checkpoints.last,
            "resumed_from": self.checkpoints.resumed_from,
            "rss_bytes": rss_bytes(),
        }


def rss_bytes() -> int:
    """This process's resident set size (VmRSS), 0 where /proc is not available."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
