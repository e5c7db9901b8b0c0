"""Who may proceed: the bookkeeping of sync (BSP), async (ASP) and SSP modes.

The server never blocks its loop on a slow worker. A request that must wait (a
sync ``push_pull`` until the round's last gradient, an SSP ``clock``/``pull`` until
the slowest worker catches up, a ``barrier``) becomes a ``Waiter`` with a deadline;
after every event the server asks ``take_ready`` which waiters can now be
answered, and ``take_expired`` which have waited too long.

SSP rule (Ho et al., 2013): a worker at clock ``c`` is answered only when the
slowest live worker's clock is at least ``c - s``. Sync mode applies the same rule
to ``clock`` with ``s = 0``; async never gates. Live workers are all expected
workers (ids ``0..num_workers-1``), registered or not: counting only those
registered so far would let an early worker race ahead of one still starting.

Liveness: every message from a registered worker (its requests and its client's
heartbeat pings) records when it was last seen. ``silent(now, timeout)`` names the
workers not heard from for longer than the server's ``worker_timeout``; the server
then ``lose``s them: they leave ``live`` (nobody waits for them any more) and
``registered`` (so a worker that was only slow is told to register again), and
are listed in ``lost``. A lost worker that registers again ``rejoin``s.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("sync", "async", "ssp")


@dataclass
class Waiter:
    """A deferred reply. kind: "step" (sync: until version >= target), "clock" (until
    the slowest clock >= target - bound), "barrier" (until generation > target)."""

    identity: bytes
    op: str
    wid: int
    seq: int
    kind: str
    target: int
    deadline: float
    since: int | None = None
    seg: str | None = None  # the shared-memory segment the worker reads parameters from


class Consistency:
    """Clocks, the sync round, the barrier and the waiters of one server."""

    def __init__(self, mode: str, num_workers: int, staleness: int) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {staleness}")
        self.mode = mode
        self.num_workers = num_workers
        self.bound: int | None = {"sync": 0, "ssp": staleness, "async": None}[mode]
        self.live: set[int] = set(range(num_workers))
        self.registered: set[int] = set()
        self.clocks: dict[int, int] = dict.fromkeys(range(num_workers), 0)
        self.last_seq: dict[int, int] = {}  # wid -> seq of its last accepted gradient
        self.round: dict[int, int] = {}  # sync: wid -> seq of its gradient in this round
        self.barrier: set[int] = set()
        self.barrier_generation = 0
        self.waiters: list[Waiter] = []
        self.max_clock_gap = 0  # the largest c - min_clock at which a clock reply went out
        self.session: dict[int, int] = {}  # wid -> seq of its latest register
        self.barrier_seq: dict[int, tuple[int, int]] = {}  # wid -> (seq, generation joined)
        self.last_seen: dict[int, float] = {}  # wid -> time.monotonic() of its last message
        self.lost: dict[int, dict] = {}  # wid -> {"reason", "version"}

    # ---- clocks ---------------------------------------------------------------------
    def min_clock(self) -> int:
        return min((self.clocks[w] for w in self.live), default=0)

    def slowest(self) -> int | None:
        return min(self.live, key=lambda w: (self.clocks[w], w), default=None)

    def clock_ready(self, c: int) -> bool:
        return self.bound is None or self.min_clock() >= c - self.bound

    def note_clock_reply(self, c: int) -> int:
        """Record that a worker at clock ``c`` is answered now; returns the slowest clock."""
        m = self.min_clock()
        self.max_clock_gap = max(self.max_clock_gap, c - m)
        return m

    # ---- sync round and barrier -----------------------------------------------------
    def round_complete(self) -> bool:
        return bool(self.round) and self.live <= set(self.round)

    def arrive_at_barrier(self, wid: int, seq: int = -1) -> int:
        """Add ``wid``; returns the generation it waits to see pass. A resend (same
        ``seq``) returns the generation it joined the first time without joining again."""
        seen = self.barrier_seq.get(wid)
        if seen is not None and seen[0] == seq:
            return seen[1]
        generation = self.barrier_generation
        self.barrier_seq[wid] = (seq, generation)
        self.barrier.add(wid)
        if self.live <= self.barrier:
            self.barrier.clear()
            self.barrier_generation += 1
        return generation

    def remove_worker(self, wid: int) -> None:
        """Stop waiting for ``wid`` (a dead worker); the caller then releases waiters."""
        self.live.discard(wid)
        if self.barrier and self.live <= self.barrier:
            self.barrier.clear()
            self.barrier_generation += 1

    # ---- liveness -------------------------------------------------------------------
    def register(self, wid: int, seq: int, now: float) -> bool:
        """A (new) session of ``wid``; returns True when it comes back from ``lost``."""
        back = self.lost.pop(wid, None) is not None
        if back:
            self.live.add(wid)
            others = [self.clocks[w] for w in self.live if w != wid]
            # it must not hold back the workers that carried on without it
            self.clocks[wid] = max(self.clocks[wid], min(others, default=0))
        self.registered.add(wid)
        self.session[wid] = seq
        self.last_seq[wid] = seq  # a new session: older seqs are stale
        self.last_seen[wid] = now
        return back

    def silent(self, now: float, timeout: float) -> list[int]:
        """Registered live workers not heard from for more than ``timeout`` seconds."""
        return sorted(w for w in self.registered & self.live
                      if now - self.last_seen.get(w, now) > timeout)

    def lose(self, wid: int, reason: str, version: int) -> list[Waiter]:
        """Drop ``wid`` from every wait; returns its own parked requests (to answer)."""
        self.remove_worker(wid)
        self.registered.discard(wid)
        self.barrier.discard(wid)
        self.lost[wid] = {"reason": reason, "version": version}
        own = [w for w in self.waiters if w.wid == wid]
        self.waiters = [w for w in self.waiters if w.wid != wid]
        return own

    def park(self, waiter: Waiter) -> None:
        """Add ``waiter``. A resend from a new address (a client that reconnected) replaces
        the request parked for the old one, keeping its deadline; from the same address
        it is answered too (every request gets a reply)."""
        for i, w in enumerate(self.waiters):
            if (w.wid, w.seq, w.op, w.kind) == (waiter.wid, waiter.seq, waiter.op, waiter.kind) \
                    and w.identity != waiter.identity:
                waiter.deadline = w.deadline
                self.waiters[i] = waiter
                return
        self.waiters.append(waiter)

    # ---- waiters --------------------------------------------------------------------
    def ready(self, w: Waiter, version: int) -> bool:
        if w.kind == "step":
            return version >= w.target
        if w.kind == "clock":
            return self.clock_ready(w.target)
        return self.barrier_generation > w.target

    def take_ready(self, version: int) -> list[Waiter]:
        ready = [w for w in self.waiters if self.ready(w, version)]
        if ready:
            self.waiters = [w for w in self.waiters if not self.ready(w, version)]
        return ready

    def take_expired(self, now: float) -> list[Waiter]:
        expired = [w for w in self.waiters if w.deadline <= now]
        if expired:
            self.waiters = [w for w in self.waiters if w.deadline > now]
        return expired

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self.waiters), default=None)

    def describe_wait(self, w: Waiter, version: int) -> str:
        """What ``w`` is waiting for, in words (for the timeout error)."""
        if w.kind == "step":
            missing = sorted(self.live - set(self.round))
            return f"gradients from workers {missing} for version {w.target - 1} (at {version})"
        if w.kind == "clock":
            slow = self.slowest()
            return (f"the slowest worker ({slow}, clock {self.clocks.get(slow)}) to reach clock "
                    f"{w.target - (self.bound or 0)} (worker {w.wid} is at clock {w.target}, "
                    f"staleness bound {self.bound})")
        missing = sorted(self.live - self.barrier)
        return f"workers {missing} at barrier {w.target}"
