"""The update after each backward in a parameter-server job, one class per mode.

Called by ``distnet.train.fit`` as ``update(step)``:

* ``SyncUpdate``: ``push_pull`` every step; the averaged new parameters are copied
  into ``Parameter.data`` in place.
* ``AsyncUpdate``: gradients accumulate for ``push_every`` steps, then go out in
  one push; a pull is sent every ``pull_every`` steps and waited for only after
  the next forward/backward, so the transfer overlaps computation (tickets), or
  at once with ``pull_overlap`` off: no overlap, but the next gradient is computed
  on parameters that include this worker's own last push (one update less stale).
* ``SSPUpdate``: push and ``clock`` every step; the server holds the clock reply
  while this worker is more than ``staleness`` clocks ahead of the slowest, and
  the worker pulls when its cached parameters are older than that bound allows
  (or every ``pull_every`` steps).

Each records what the metrics need (``metrics()``): wait and round-trip times in
ms, bytes sent and received, the parameter version and the staleness seen.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from distnet import backend


class PSUpdate:
    """Shared parts of the parameter-server updates: timing, bytes and loading parameters."""

    def __init__(self, model: Any, client: Any, config: dict[str, Any], weight: Any,
                 version: int) -> None:
        self.client, self.config, self.weight = client, config, weight
        self.params = dict(model.named_parameters())
        self.on_host = model.device == "cpu"
        # pulled arrays are copied straight into the model's arrays (no temporaries)
        self.out = {n: p.data for n, p in self.params.items()} if self.on_host else None
        self.version = version
        self.record: dict[str, Any] = {}  # summed over the steps since the last record
        self._steps = 0
        self._bytes = (client.bytes_sent, client.bytes_received)

    def __call__(self, step: int) -> None:
        self.step(step)
        self._steps += 1

    def step(self, step: int) -> None:
        raise NotImplementedError

    def wait(self, ticket: Any, what: str) -> tuple[Any, float]:
        t0 = time.perf_counter()
        result = self.client.wait(ticket)  # the client's timeout (see worker.client_timeout)
        self.record[what] = self.record.get(what, 0.0) + 1e3 * (time.perf_counter() - t0)
        return result, t0

    def note(self, **values: float) -> None:
        """Add to this interval's sums (``staleness``: keep the largest instead)."""
        for key, value in values.items():
            old = self.record.get(key, 0)
            self.record[key] = max(old, value) if key == "staleness" else old + value

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        if not self.on_host:  # out= copied them already on the CPU
            for name, a in arrays.items():
                self.params[name].data[...] = backend.to_device(a, backend.device_of(
                    self.params[name].data))

    def grads(self, scale: float = 1.0) -> dict[str, Any]:
        if scale != 1.0:
            for p in self.params.values():
                p.grad *= np.float32(scale)
        return {n: p.grad for n, p in self.params.items()}

    def metrics(self) -> dict[str, Any]:
        """Per-step means since the last call (latencies in ms, bytes), the largest
        staleness, and the parameter version: what fit adds to its step records."""
        n = max(self._steps, 1)
        sent, received = self.client.bytes_sent, self.client.bytes_received
        out: dict[str, Any] = {k: (v if k in ("staleness", "min_clock") else round(v / n, 3))
                               for k, v in self.record.items()}
        out.update(version=self.version, bytes_sent=(sent - self._bytes[0]) // n,
                   bytes_received=(received - self._bytes[1]) // n, steps=self._steps)
        self._bytes, self.record, self._steps = (sent, received), {}, 0
        return out

    def finish(self) -> None:
        """Wait for everything still in flight."""


class SyncUpdate(PSUpdate):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        shared = self.client.shared_arrays() if self.on_host else None
        if shared is not None:
            # same host: compute on the server's shared parameters and write gradients
            # straight into this worker's slot (PSClient.shared_arrays says why it is safe)
            views, slots = shared
            for name, p in self.params.items():  # the servers' values are the truth
                p.data, p.grad = views[name], slots[name]
            self.out = dict(views)

    def step(self, step: int) -> None:
        ticket = self.client.push_pull(self.grads(self.weight()), self.version, out=self.out)
        (self.version, arrays), _ = self.wait(ticket, "push_pull_ms")
        self.load(arrays)
        self.note(staleness=0)


class AsyncUpdate(PSUpdate):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.push_every, self.pull_every = int(self.config["push_every"]), int(
            self.config["pull_every"])
        self.overlap = bool(self.config.get("pull_overlap", True))
        # two gradient buffers: one in flight (sent without a copy), one accumulating
        self.buffers = [{n: np.zeros(p.shape, np.float32) for n, p in self.params.items()}
                        for _ in range(2)]
        self.pushes: list[Any] = [None, None]
        self.current, self.count, self.grad_version = 0, 0, None
        self.pull_ticket: Any = None

    def step(self, step: int) -> None:
        buf, w = self.buffers[self.current], np.float32(self.weight())
        for n, p in self.params.items():
            g = backend.to_host(p.grad)
            if self.count == 0:
                np.multiply(g, w, out=buf[n])
            elif w == 1:
                buf[n] += g
            else:
                buf[n] += g * w
        self.count += 1
        self.grad_version = self.version if self.grad_version is None else self.grad_version
        if self.count == self.push_every:
            self._push()
        if self.pull_ticket is not None:  # sent one step ago: it overlapped this step's compute
            self._take_pull()
        if (step + 1) % self.pull_every == 0:
            # sent after the push on the same socket: the server answers it with that push applied
            self.pull_ticket = self.client.pull(since_version=self.version, out=self.out)
            if not self.overlap:
                self._take_pull()

    def _take_pull(self) -> None:
        (version, arrays), _ = self.wait(self.pull_ticket, "pull_wait_ms")
        self.pull_ticket = None
        if arrays:
            self.version = version
            self.load(arrays)

    def _push(self) -> None:
        buf = self.buffers[self.current]
        if self.count > 1:
            for g in buf.values():
                g *= np.float32(1.0 / self.count)
        self.pushes[self.current] = (self.client.push(buf, self.grad_version), self.grad_version,
                                     time.perf_counter())
        self.current ^= 1
        self.count, self.grad_version = 0, None
        self._settle(self.current)  # the buffer we accumulate into next must be free

    def _settle(self, i: int) -> None:
        if self.pushes[i] is None:
            return
        ticket, ver, sent = self.pushes[i]
        version, _ = self.wait(ticket, "push_wait_ms")
        self.pushes[i] = None
        # the server answers with its version after applying: it had moved on by this many
        self.note(push_ms=1e3 * (time.perf_counter() - sent), staleness=max(0, version - 1 - ver))

    def finish(self) -> None:
        if self.count:
            self._push()
        for i in (0, 1):
            self._settle(i)
        if self.pull_ticket is not None:
            self._take_pull()


class SSPUpdate(PSUpdate):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bound, self.pull_every = int(self.config["staleness"]), int(self.config["pull_every"])
        self.cache_clock = 0  # the slowest worker's clock when the cached parameters came
        self.max_gap = 0

    def step(self, step: int) -> None:
        clock = step + 1
        push = self.client.push(self.grads(self.weight()), self.version)
        # the server holds this reply while we are more than `bound` clocks ahead
        min_clock, _ = self.wait(self.client.clock(clock), "clock_wait_ms")
        version, _ = self.wait(push, "push_wait_ms")  # same socket, answered before the clock
        gap = clock - min_clock
        self.max_gap = max(self.max_gap, gap)
        self.note(staleness=gap)
        self.record["min_clock"] = min_clock
        if self.cache_clock < clock - self.bound or clock % self.pull_every == 0:
            # every worker's pushes up to min_clock are in: the cache is that fresh
            (version, arrays), _ = self.wait(self.client.pull(out=self.out), "pull_ms")
            self.version, self.cache_clock = version, min_clock
            self.load(arrays)


UPDATES = {"sync": SyncUpdate, "async": AsyncUpdate, "ssp": SSPUpdate}
