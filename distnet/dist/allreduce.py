"""Mode ``allreduce``: no server; every step the workers sum their gradients with MPI.

This is the peer the parameter server is measured against (Horovod's way): each
worker computes the gradient of its slice of the global batch, one
``comm.Allreduce(MPI.IN_PLACE, flat)`` sums them, and every worker applies the
same local optimizer step, so all replicas stay identical without a server.

All gradients live in ONE flat, preallocated float32 buffer: on the CPU each
``Parameter.grad`` is re-pointed at its slice of it, so backward writes straight
into the message and a step is one large Allreduce (one latency, full
bandwidth) with no copy in or out. On a GPU the gradients are copied into it
(the PyPI MPICH is not CUDA-aware).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from distnet import backend


class AllreduceUpdate:
    """``update(step)`` for fit: Allreduce the gradients, average, optimizer step.

    weight: a callable giving this worker's share of the current global batch
    (its examples * workers / global batch: 1.0 when the batch splits evenly), so
    the average is the gradient of the whole global batch even when it does not.
    """

    def __init__(self, model: Any, optimizer: Any, schedule: Any, comm: Any, *,
                 weight: Any = None, watchdog: Any = None, timeout: float = 120.0) -> None:
        from mpi4py import MPI

        self._mpi = MPI
        self.optimizer, self.schedule, self.comm = optimizer, schedule, comm
        self.weight = weight
        self.watchdog, self.timeout = watchdog, timeout
        self.params = [p for _, p in model.named_parameters()]
        dtypes = {np.dtype(p.data.dtype) for p in self.params}
        if dtypes != {np.dtype(np.float32)}:
            raise ValueError(f"allreduce needs float32 parameters, got {sorted(map(str, dtypes))}")
        sizes = [p.size for p in self.params]
        self.flat = np.zeros(sum(sizes), dtype=np.float32)
        offsets = np.cumsum([0, *sizes])
        self.views = [self.flat[a:b].reshape(p.shape)
                      for a, b, p in zip(offsets[:-1], offsets[1:], self.params, strict=True)]
        self.on_host = model.device == "cpu"
        if self.on_host:
            for p, view in zip(self.params, self.views, strict=True):
                p.grad = view
        self.scale = np.float32(1.0 / comm.size)
        self.last = {"allreduce_ms": 0.0, "bytes_sent": 0, "bytes_received": 0}
        self.total_bytes = 0

    def __call__(self, step: int) -> None:
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is not view:  # a layer rebound .grad, or the model is on a GPU
                np.copyto(view, backend.to_host(p.grad))
                if self.on_host:
                    p.grad = view
        w = 1.0 if self.weight is None else float(self.weight())
        if w != 1.0:
            self.flat *= np.float32(w)
        t0 = time.perf_counter()
        if self.watchdog is not None:
            with self.watchdog.guard(f"the gradients of step {step} (allreduce)", self.timeout):
                self.comm.Allreduce(self._mpi.IN_PLACE, self.flat)
        else:
            self.comm.Allreduce(self._mpi.IN_PLACE, self.flat)
        ms = 1e3 * (time.perf_counter() - t0)
        self.flat *= self.scale
        if not self.on_host:
            for p, view in zip(self.params, self.views, strict=True):
                p.grad[...] = backend.to_device(view, backend.device_of(p.data))
        if self.schedule is not None:
            self.optimizer.lr = self.schedule(step)
        self.optimizer.step()
        # a ring allreduce sends and receives about 2 (n-1)/n of the buffer per rank
        n = self.comm.size
        moved = int(2 * (n - 1) / n * self.flat.nbytes)
        self.total_bytes += moved
        self.last = {"allreduce_ms": ms, "bytes_sent": moved, "bytes_received": moved}

    def metrics(self) -> dict[str, Any]:
        """What the step's metrics record adds: latency and bytes of the last Allreduce."""
        return dict(self.last)


def run_allreduce_worker(config: dict[str, Any], comm: Any, watchdog: Any) -> dict | None:
    """Train with allreduce on every rank of ``comm``; rank 0 evaluates and saves."""
    from distnet.dist.worker import WorkerSetup, finish_chief

    setup = WorkerSetup(config, worker_id=comm.rank, world=comm.size)
    model, optimizer, schedule = setup.build(with_optimizer=True)
    update = AllreduceUpdate(model, optimizer, schedule, comm, weight=setup.shard.weight_now,
                             watchdog=watchdog, timeout=float(config["timeout"]))
    history = setup.fit(model, update)
    with watchdog.guard("all workers to finish training", float(config["timeout"])):
        comm.Barrier()
    if comm.rank != 0:
        return None
    return finish_chief(config, setup, model, history, optimizer=optimizer,
                        extra={"allreduce_bytes_per_rank": update.total_bytes})
