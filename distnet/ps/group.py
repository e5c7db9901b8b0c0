"""Several server shards in one loop: how one server process serves P shards.

    group = shard_group({"w": w0}, parts=8, optimizer="momentum", mode="sync")
    group.start_thread()                      # or group.run() in a process of its own
    client = PSClient(group.addresses, worker_id=0)

Each shard is a whole ``ParameterServer`` with its own socket, version and
optimizer, exactly as if it ran in a process of its own: everything said of K
servers (the byte-balanced plan, per-shard atomicity, equality with one server)
holds. What one loop adds is pipelining, the BytePS partitioning. A client sends
its P messages at once, on P connections; the loop applies each shard's update
as soon as that shard's message is in and sends its reply while the other
messages are still arriving, so the optimizer's work overlaps the transfer instead
of sitting between receive and reply. What that buys depends on spare cores: on
a 2-core machine a 16 MB momentum push+pull with 8 shards gained only 2-3 points
over one shard (82% against 80% of a raw ZeroMQ echo; each extra message costs
~0.3 ms of CPU there), where a bare prototype without distnet's checks reached
~100% (``benchmarks/bench_ps_throughput.py``, BENCHMARKS.md). For small models one
shard is better: every extra message costs its fixed overhead (``parts_for``).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

POLL_S = 0.05  # how often an idle loop looks at stop(), deadlines and heartbeats
PART_BYTES = 2 << 20  # about this much of the parameters per shard when parts="auto"
MAX_PARTS = 16


def parts_for(nbytes: int, parts: int | str = "auto") -> int:
    """How many shards one server process should hold for ``nbytes`` of parameters:
    ``parts`` itself when it is a number, else one per ``PART_BYTES`` (1 to 16)."""
    if parts == "auto":
        return max(1, min(MAX_PARTS, round(nbytes / PART_BYTES)))
    n = int(parts)
    if n < 1:
        raise ValueError(f"shards per server must be >= 1 or 'auto', got {parts!r}")
    return n


def serve_shards(servers: Sequence[Any], *, handle_signals: bool = True) -> None:
    """Serve every shard of ``servers`` from this thread until each is stopped (its
    ``shutdown``, ``stop()``, an abort, or SIGTERM for all of them); a stopped shard
    writes its stop checkpoint and closes its socket while the others go on."""
    for s in servers:
        s._ran = True
    active = list(servers)
    previous = _catch_sigterm(active) if handle_signals else None
    poller = zmq.Poller()
    channels: dict[int, Any] = {}  # descriptor -> (shard, its same-host channel: local.py)
    for s in active:
        poller.register(s._sock, zmq.POLLIN)
        poller.register(s._monitor, zmq.POLLIN)
        if s.local is not None:
            poller.register(s.local.fd, zmq.POLLIN)
    try:
        while active:
            now = time.monotonic()
            wait = POLL_S
            for s in list(active):
                if s._stop.is_set() or (s.abort_reason is not None and now >= s._abort_at):
                    active.remove(s)
                    poller.unregister(s._sock)
                    poller.unregister(s._monitor)
                    for peer in s.local_peers if s.local is not None else ():
                        poller.unregister(peer.fd)
                        del channels[peer.fd]
                    if s.local is not None:
                        poller.unregister(s.local.fd)
                    s._finish()
                    continue
                deadline = s.consistency.next_deadline()
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - now))
            if not active:
                break
            ready = dict(poller.poll(int(wait * 1000)))
            for s in active:  # in shard order: the first shard's reply goes out first
                if s._sock in ready:
                    s._receive()
                if s._monitor in ready:
                    s._note_handshakes()
            for s, peer in [channels[fd] for fd in channels if fd in ready]:
                s._receive_local(peer)
            # closed by the worker or by a failed send; before accepting, which may reuse fds
            for s, peer in [c for c in channels.values() if c[1].closed]:
                poller.unregister(peer.fd)
                del channels[peer.fd]
                s._forget(peer)
            for s in active:
                if s.local is not None and s.local.fd in ready:
                    for peer in s.local.accept():
                        s.local_peers.append(peer)
                        channels[peer.fd] = (s, peer)
                        poller.register(peer.fd, zmq.POLLIN)
            now = time.monotonic()
            for s in active:
                s._expire(now)
                s._check_liveness(now)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for s in active:
            s._finish()


def _catch_sigterm(servers: list[Any]) -> Any:
    """SIGTERM stops every shard (main thread only, and only if nobody handles it yet:
    ``distnet serve`` installs its own handler that calls ``stop()``)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def stop_all(*_: Any) -> None:
        for s in servers:
            s._stop.set()

    return signal.signal(signal.SIGTERM, stop_all)


class ServerGroup:
    """Shards served by one loop (``serve_shards``), with the interface of one server."""

    def __init__(self, servers: Sequence[Any]) -> None:
        if not servers:
            raise ValueError("a server group needs at least one shard")
        self.servers = list(servers)
        self._thread: threading.Thread | None = None

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    def bind_local(self) -> list[str | None]:
        """Each shard's ``inproc://`` endpoint (``ParameterServer.bind_local``)."""
        return [s.bind_local() for s in self.servers]

    def run(self, *, handle_signals: bool = True) -> None:
        serve_shards(self.servers, handle_signals=handle_signals)

    def start_thread(self) -> threading.Thread:
        """Run the loop in a daemon thread (a server co-located with a worker, tests)."""
        for s in self.servers:
            s._ran = True  # before the thread starts: stop() must not close the sockets
        first = self.servers[0].server_id
        self._thread = threading.Thread(target=self.run, name=f"ps-shards-{first}", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, join_timeout: float = 5.0) -> None:
        for s in self.servers:
            s.stop()  # its own thread is None: this only asks the loop to let it go
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(join_timeout)

    def stats(self) -> list[dict[str, Any]]:
        return [s.stats() for s in self.servers]


def shard_group(params: dict[str, np.ndarray], parts: int | str = "auto", *,
                first_id: int = 0, num_shards: int | None = None,
                binds: Sequence[str] | None = None, **server_kwargs: Any) -> ServerGroup:
    """``parts`` shards (``plan_shards``) of ``params`` as one ServerGroup.

    With ``num_shards`` (the job's total) and ``first_id``, ``params`` is the whole
    model and this group holds shards ``first_id .. first_id+parts-1`` of that plan:
    several server processes then share one plan. binds: one address per shard
    (default ``shard_binds(bind, parts)``: a free port each unless ``bind`` names one).
    Other arguments go to every
    ``ParameterServer``.
    """
    from distnet.ps.server import ParameterServer  # noqa: PLC0415 - server uses serve_shards
    from distnet.ps.sharding import plan_shards, split  # noqa: PLC0415

    n = parts_for(sum(a.nbytes for a in params.values()), parts)
    total = n if num_shards is None else int(num_shards)
    if first_id < 0 or first_id + n > total:
        raise ValueError(f"shards {first_id}..{first_id + n - 1} are not all in 0..{total - 1}")
    binds = shard_binds(server_kwargs.pop("bind", "tcp://127.0.0.1:0"), n) \
        if binds is None else binds
    if len(binds) != n:
        raise ValueError(f"{len(binds)} bind addresses for {n} shards")
    plan = plan_shards({k: a.shape for k, a in params.items()}, total)
    pieces = split(params, plan)
    servers: list[Any] = []
    try:
        for j in range(n):
            servers.append(ParameterServer(pieces[first_id + j], server_id=first_id + j,
                                           bind=binds[j], **server_kwargs))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return ServerGroup(servers)


def shard_binds(bind: str, parts: int) -> list[str]:
    """One address per shard from one ``--bind``: port 0 for each when it is 0, else
    consecutive ports from the one given (``tcp://*:5555`` -> 5555, 5556, ...)."""
    if parts == 1:
        return [bind]
    head, sep, port = bind.rpartition(":")
    if not bind.startswith("tcp://") or not sep or not port.isdigit():
        raise ValueError(f"several shards per server need a tcp://HOST:PORT bind address, "
                         f"got {bind!r}")
    first = int(port)
    return [f"{head}:{first + j if first else 0}" for j in range(parts)]
