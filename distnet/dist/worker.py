"""The worker loop of a parameter-server job: data slice, model, client, update per mode.

Every worker loads the whole data set, builds the same seeded model and sets its
``Normalize`` from the FULL training set, so all replicas share one normalisation
(buffers never travel; only Parameters live on the servers).

The data split (``GlobalBatchSlice``): every worker iterates the same shuffled
global batches (same seed and epoch) and takes its contiguous slice
``[n*r//W, n*(r+1)//W)`` of each. The union of a step's per-worker batches is
then exactly the 1-worker batch, so sync mode with W workers computes the same
mean gradient as one worker on the global batch. (Sharding the data set and
shuffling each shard on its own would give different batches.) When a batch does
not split evenly, each gradient is scaled by ``n_r * W / n`` so the server's plain
average is still the mean over the global batch; a worker whose slice is empty (a
last batch smaller than W) computes on one example and sends a zero gradient.

The update of each mode (after every backward) is in ``updates.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distnet import backend


class GlobalBatchSlice:
    """Worker ``rank``'s slice of every global batch of ``train`` (see the module doc).

    ``len`` is the full data set's, so ``fit`` counts global steps; ``weight_now()``
    is the gradient weight of the batch last yielded.
    """

    def __init__(self, train: Any, rank: int, world: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"worker {rank} is not in 0..{world - 1}")
        self.train, self.rank, self.world = train, rank, world
        self._weight = 1.0

    def __len__(self) -> int:
        return len(self.train)

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False, epoch: int = 0):
        for xb, yb in self.train.batches(batch_size, shuffle=shuffle, seed=seed,
                                         drop_last=drop_last, epoch=epoch):
            n = len(yb)
            a, b = n * self.rank // self.world, n * (self.rank + 1) // self.world
            if b > a:
                self._weight = (b - a) * self.world / n
                yield xb[a:b], yb[a:b]
            else:
                self._weight = 0.0
                yield xb[:1], yb[:1]

    def weight_now(self) -> float:
        return self._weight


def rank_metrics_path(config: dict[str, Any], rank: int | str) -> Path | None:
    """``metrics.jsonl`` -> ``metrics.rank<k>.jsonl``: every rank writes its own file
    (``rank`` is the MPI rank, or a label such as ``server0`` outside MPI)."""
    if not config.get("metrics"):
        return None
    path = Path(config["metrics"])
    tag = f"rank{rank}" if isinstance(rank, int) else rank
    return path.with_name(f"{path.stem}.{tag}{path.suffix}")


class StepMetrics:
    """Passed to ``fit`` as its metrics writer: adds the update's figures to step records."""

    def __init__(self, writer: Any, update: Any) -> None:
        self.writer, self.update = writer, update

    def write(self, **record: Any) -> None:
        if record.get("kind") == "step":
            record.update(self.update.metrics())
        self.writer.write(**record)


class WorkerSetup:
    """What every worker builds the same way: data, its batch slice, model, metrics."""

    def __init__(self, config: dict[str, Any], worker_id: int, world: int,
                 rank: int | None = None) -> None:
        from distnet.data import load_data

        self.config, self.worker_id, self.world = config, worker_id, world
        self.rank = worker_id if rank is None else rank  # MPI rank: servers come first
        self.device = backend.check_device(config.get("device") or backend.default_device())
        self.train, self.val, self.info = load_data(config["data"], val_size=config["val_size"],
                                                    seed=config["seed"])
        self.shard = GlobalBatchSlice(self.train, worker_id, world)
        self.is_chief = worker_id == 0

    def build(self, with_optimizer: bool = False) -> Any:
        """The seeded model (normalised on the full training set) on this worker's device;
        with_optimizer: ``(model, optimizer, schedule)`` as for a local run."""
        from distnet.nn import skip_input_grad
        from distnet.setup import build_model_for, build_training, normalize_inputs

        if with_optimizer:
            model, optimizer, schedule = build_training(self.config, self.info, len(self.train))
        else:  # the optimizer lives on the servers
            model, optimizer, schedule = build_model_for(self.config, self.info), None, None
            skip_input_grad(model)  # as build_training does: no d loss / d data needed
        normalize_inputs(model, self.train)
        model.to(self.device)
        return (model, optimizer, schedule) if with_optimizer else model

    def fit(self, model: Any, update: Any, start_step: int = 0) -> list[dict[str, Any]]:
        from distnet.metrics import MetricsWriter
        from distnet.nn import CrossEntropyLoss
        from distnet.setup import augmentation_for
        from distnet.train import fit

        c = self.config
        with MetricsWriter(rank_metrics_path(c, self.rank), rank=self.rank, mode=c["mode"],
                           role="worker", worker=self.worker_id) as writer:
            return fit(model, self.shard, self.val if self.is_chief else None,
                       epochs=int(c["epochs"]), batch_size=int(c["batch_size"]),
                       criterion=CrossEntropyLoss(), update=update, seed=int(c["seed"]),
                       augment=augmentation_for(c, self.info), metrics=StepMetrics(writer, update),
                       progress=self.is_chief and not c.get("no_progress"),
                       start_step=start_step,
                       desc=f"{c['mode']} worker {self.worker_id}/{self.world}")


def parse_codec(spec: str | None) -> tuple[str, dict[str, Any]]:
    """``none | fp16 | int8 | topk[:PERCENT]`` -> (codec name, its config)."""
    name, _, arg = str(spec or "none").partition(":")
    if name == "topk" and arg:
        return name, {"ratio": float(arg) / 100.0}
    if arg:
        raise ValueError(f"codec {name!r} takes no argument (got {spec!r})")
    return name, {}


def client_timeout(config: dict[str, Any]) -> float:
    """How long the worker waits for a reply: a little longer than the servers hold one.

    A server answers a request it cannot grant within ``timeout`` with an error that
    says why (which workers it still waits for); the client's own limit only has to
    catch a server that died, so it leaves the server's explanation time to arrive.
    """
    timeout = float(config["timeout"])
    return timeout + max(2.0, 0.1 * timeout)


def run_worker(config: dict[str, Any], addresses: list[str], *, worker_id: int,
               rank: int | None = None) -> dict[str, Any] | None:
    """Train as worker ``worker_id`` against the servers at ``addresses``.

    Returns the result on the chief (worker 0), which pulls the final parameters,
    evaluates, saves the checkpoint and shuts the servers down; None elsewhere.
    """
    from distnet.cli.options import client_kwargs
    from distnet.dist.updates import UPDATES
    from distnet.ps import PSClient

    world = int(config["workers"])
    setup = WorkerSetup(config, worker_id, world, rank)
    model = setup.build()
    name, codec_config = parse_codec(config.get("codec"))
    client = PSClient(addresses, worker_id, codec=name, codec_config=codec_config,
                      timeout=client_timeout(config), **client_kwargs(config))
    try:
        layout = client.register()
        if sorted(layout.names) != sorted(n for n, _ in model.named_parameters()):
            raise ValueError(f"the servers hold {layout.names[:4]}..., not this model's "
                             f"parameters: were they started with --model {config['model']}?")
        update = UPDATES[config["mode"]](model, client, config, setup.shard.weight_now,
                                         layout.version)
        # everyone starts together: otherwise in async mode the first worker up trains
        # alone for a while and the last starts from parameters far from its own
        client.wait(client.barrier())
        # start from the servers' parameters (equal to ours by seed, but they are the truth)
        update.version, arrays = client.wait(client.pull(out=update.out))
        update.load(arrays)
        start = resume_step(config, client, worker_id, update.version)
        history = setup.fit(model, update, start_step=start)
        update.finish()
        # nobody may stop the servers before every worker's last gradient is in
        client.wait(client.barrier())
        if not setup.is_chief:
            return None
        version, arrays = client.wait(client.pull(out=update.out))
        update.load(arrays)
        stats = client.stats()
        extra = {"server_version": version, "server_stats": stats,
                 "max_staleness": max((s.get("max_clock_gap", 0) for s in stats), default=0)}
        result = finish_chief(config, setup, model, history, extra=extra)
        client.shutdown()
        return result
    finally:
        client.close()


def resume_step(config: dict[str, Any], client: Any, worker_id: int, version: int) -> int:
    """The global step to continue from when the servers were resumed from a checkpoint
    (0 for fresh servers): sync makes one version per step; async ``workers/push_every``
    versions per step; in SSP each worker continues from its own restored clock."""
    if version <= 0:
        return 0
    if config["mode"] == "sync":
        return version
    if config["mode"] == "async":
        return int(version * int(config["push_every"]) / int(config["workers"]))
    clocks = [int(s.get("clocks", {}).get(worker_id, 0)) for s in client.stats()]
    return min(clocks) if clocks else 0


def finish_chief(config: dict[str, Any], setup: WorkerSetup, model: Any,
                 history: list[dict[str, Any]], optimizer: Any = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the final model on val, save the checkpoint, return the job's result."""
    import json

    from distnet.checkpoint import save_checkpoint
    from distnet.train import evaluate

    result: dict[str, Any] = dict(history[-1]) if history else {}
    if history:  # the job's throughput: every worker's examples, not only the chief's
        result["worker_samples_per_s"] = result.get("samples_per_s")
        result["samples_per_s"] = len(setup.train) / max(result.get("seconds", 0.0), 1e-9)
    if len(setup.val):
        final = evaluate(model, setup.val)
        result.update(val_accuracy=final["accuracy"], val_loss=final["loss"])
    result.update(mode=config["mode"], workers=setup.world, run_dir=config.get("run_dir"),
                  **(extra or {}))
    if config.get("out"):
        meta = {"model": config["model"], "data": setup.info, "mode": config["mode"],
                "config": json.loads(json.dumps(
                    {k: v for k, v in config.items() if not k.startswith("_")}, default=str)),
                "result": {k: v for k, v in result.items() if k != "server_stats"}}
        if optimizer is None:
            meta["optimizer_note"] = "the optimizer state stayed on the parameter servers"
        save_checkpoint(config["out"], model, optimizer, meta=meta)
        result["checkpoint"] = config["out"]
    return result
