"""The server role: one parameter-server shard built from the job's settings.

The initial parameters come from the same seeded model every worker builds, so
servers and workers agree without sending the model around. Only Parameters go
to the servers; buffers (``Normalize``'s mean and std, batch-norm statistics) are
set identically on every worker and never travel. The parameters are split with
``plan_shards`` over ``K`` servers; shard ``i`` keeps piece ``i``.

The optimizer runs on the servers, so its learning-rate schedule is evaluated at
the server's *version* (updates applied so far). In sync mode that is the global
step. In async and SSP modes every push is an update, so the schedule's length
and warm-up are stretched to ``workers / push_every`` updates per global step.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import numpy as np

from distnet import backend


def initial_parameters(config: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """name -> float32 array of the seeded model's Parameters (model order), and the
    number of training examples (for the schedule's length)."""
    from distnet.data import load_data
    from distnet.setup import build_model_for

    train, _, info = load_data(config["data"], val_size=config["val_size"], seed=config["seed"])
    model = build_model_for(config, info)
    params = {name: np.ascontiguousarray(backend.to_host(p.data))
              for name, p in model.named_parameters()}
    return params, len(train)


class UpdateSchedule:
    """The run's schedule (``setup.build_schedule_for``: the same one a local run uses) as
    a function of the server version, which counts ``updates_per_step`` per global step.

    In async and SSP modes each push is applied on its own, so N workers make N updates
    per global batch where sync makes one from their average. Each update's rate is
    divided by ``updates_per_step`` (never multiplied), so the parameters move as far per
    global batch as in sync mode: with momentum 0.9 and N full-rate updates, async
    training of the lenet300 recipe diverged.
    """

    def __init__(self, config: dict[str, Any], n_train: int) -> None:
        from distnet.setup import build_schedule_for

        self.base = build_schedule_for(config, n_train)
        self.updates_per_step = 1.0
        if config["mode"] == "async":
            self.updates_per_step = int(config["workers"]) / int(config["push_every"])
        elif config["mode"] == "ssp":
            self.updates_per_step = float(config["workers"])
        self.scale = 1.0 / max(self.updates_per_step, 1.0)

    def __call__(self, version: int) -> float:
        if self.updates_per_step == 1.0:
            return self.base(version)
        return self.base(int(version / self.updates_per_step)) * self.scale


def _server_args(config: dict[str, Any], n_train: int) -> dict[str, Any]:
    """ParameterServer arguments every shard of the job shares."""
    from distnet.cli.options import server_kwargs
    from distnet.setup import optimizer_config

    return dict(optimizer=config["optimizer"], optimizer_config=optimizer_config(config),
                schedule=UpdateSchedule(config, n_train), mode=config["mode"],
                num_workers=int(config["workers"]), staleness=int(config["staleness"]),
                lr_staleness_scaling=bool(config.get("staleness_lr")),
                timeout=float(config["timeout"]), **server_kwargs(config))


def create_group(config: dict[str, Any], *, index: int, num_servers: int,
                 host: str = "127.0.0.1", bind: str | None = None) -> Any:
    """Server process ``index`` of ``num_servers``: a ``ServerGroup`` of
    ``--shards-per-server`` shards (``auto``: one per ~2 MB of its parameters), shards
    ``index*P .. index*P+P-1`` of the job's ``num_servers*P``, each on its own port
    (``bind``: the first shard's address, the others on the next ports; default a free
    port on ``host`` for each). Ready to ``run()``; workers connect to its ``addresses``."""
    from distnet.ps.group import parts_for, shard_binds, shard_group

    if not 0 <= index < num_servers:
        raise ValueError(f"server index {index} is not in 0..{num_servers - 1}")
    params, n_train = initial_parameters(config)
    total = sum(a.nbytes for a in params.values())
    parts = parts_for(total // num_servers, config.get("shards_per_server") or 1)
    return shard_group(params, parts, first_id=index * parts, num_shards=num_servers * parts,
                       binds=shard_binds(bind or f"tcp://{host}:0", parts),
                       **_server_args(config, n_train))


def serve(server: Any, config: dict[str, Any], rank: int | str,
          label: str | None = None) -> list[dict[str, Any]]:
    """Run ``server`` (a ParameterServer or a ServerGroup) until a worker asks it to shut
    down (or SIGTERM/SIGINT stop it); writes each shard's final counters to this rank's
    metrics file (``label`` names the file instead, for a server sharing its rank with a
    worker) and returns them, one dict per shard."""
    from distnet.dist.worker import rank_metrics_path
    from distnet.metrics import MetricsWriter
    from distnet.optim.blas import limit_threads, load
    from distnet.ps.transport import keep_receive_buffers

    previous = {}
    if threading.current_thread() is threading.main_thread():  # a process of its own
        # one BLAS thread: spinning BLAS threads took the cores from ZeroMQ's I/O threads
        # (16 MB push_pull: 55-60% of raw pyzmq throughput with them, 72-83% without)
        limit_threads(1)
        keep_receive_buffers()  # no page faults for each received gradient (transport.py)
        # a terminated server closes its socket cleanly instead of dying mid-reply
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: server.stop())
    load()  # in a worker's process too (--colocate): not in the first round
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = [s.stats() for s in getattr(server, "servers", [server])]
    with MetricsWriter(rank_metrics_path(config, label or rank),
                       rank=rank, mode=config["mode"], role="server") as writer:
        for st in stats:
            writer.write(kind="server", **{k: v for k, v in st.items() if k != "requests"},
                         requests=st.get("requests", {}))
    return stats
