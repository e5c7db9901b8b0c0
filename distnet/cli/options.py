"""Option groups shared by several commands (``train`` and ``serve``)."""

from __future__ import annotations

import argparse
from typing import Any


def add_reliability_options(p: argparse.ArgumentParser) -> None:
    """Server checkpoints, failure handling, CURVE security and the same-host data plane
    (see docs/operations.md)."""
    g = p.add_argument_group("faults, security and same-host transfers")
    g.add_argument("--keys", default=None, metavar="DIR",
                   help="CURVE keys from `distnet keygen` (required to bind a non-loopback "
                        "address)")
    g.add_argument("--key-name", default=None,
                   help="this worker's key in --keys (default: worker<id>)")
    g.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind without keys (trusted networks only)")
    g.add_argument("--checkpoint-dir", default=None, help="where servers write checkpoints")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="server checkpoint every N versions (0: only on stop/SIGTERM)")
    g.add_argument("--checkpoint-keep", type=int, default=2, help="server checkpoints kept")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="PATH",
                   help="restart the servers from the newest checkpoint (or PATH)")
    g.add_argument("--worker-timeout", type=float, default=None,
                   help="seconds without a message or heartbeat before a worker is dropped")
    g.add_argument("--on-worker-loss", default="continue", choices=("continue", "abort"),
                   help="sync/ssp: carry on without a lost worker, or stop the job")
    g.add_argument("--nonfinite", default="reject", choices=("reject", "clip"),
                   help="a NaN/Inf gradient is refused (default) or its bad entries zeroed")
    g.add_argument("--shared-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="sync mode: workers on a server's host exchange gradients and "
                        "parameters through /dev/shm, only headers over ZeroMQ (not with "
                        "--keys)")


def server_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``ParameterServer`` keyword arguments for the options above."""
    return {
        "security": config.get("keys"),
        "allow_insecure": bool(config.get("insecure")),
        "checkpoint_dir": config.get("checkpoint_dir"),
        "checkpoint_every": int(config.get("checkpoint_every") or 0),
        "checkpoint_keep": int(config.get("checkpoint_keep") or 2),
        "resume": config.get("resume"),
        "worker_timeout": config.get("worker_timeout"),
        "on_worker_loss": config.get("on_worker_loss") or "continue",
        "nonfinite": config.get("nonfinite") or "reject",
        "shared_memory": config.get("shared_memory", True) is not False,
        "job_config": {k: v for k, v in config.items()
                       if not k.startswith("_") and isinstance(v, (str, int, float, bool))},
    }


def client_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """``PSClient`` keyword arguments for the options above."""
    return {"security": config.get("keys"), "key_name": config.get("key_name"),
            "shared_memory": config.get("shared_memory", True) is not False}
