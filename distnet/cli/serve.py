"""Run one parameter-server shard as a standalone process, for workers started elsewhere.

The server builds its initial parameters from the same seeded model as the
workers, so give it the model, data, seed and optimizer options the workers use
(one TOML job file can serve both: `--config job.toml`). It prints the address it
listens on and serves until the chief worker shuts it down after training
(or SIGTERM/Ctrl-C). Workers connect with `distnet train --server ADDR`: under
mpiexec every rank is a worker; outside MPI set DISTNET_RANK to the worker's id.
"""

from __future__ import annotations

import argparse
import sys

from distnet.cli.options import add_reliability_options

EXAMPLES = """\
  distnet serve --bind tcp://127.0.0.1:5555 --mode sync --workers 2
  distnet train --mode sync --workers 2 --server tcp://127.0.0.1:5555
  distnet serve --bind tcp://10.77.0.1:0 --model lenet300 --data digits --mode ssp --staleness 2
  DISTNET_RANK=1 distnet train --mode ssp --workers 2 --server tcp://10.77.0.1:5555
  distnet serve --servers 2 --server-id 1 --bind tcp://0.0.0.0:5556 --config job.toml
  distnet serve --bind tcp://127.0.0.1:5555 --shards-per-server 4 --mode async --workers 2
"""

SERVER_MODES = ("sync", "async", "ssp")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="ZeroMQ address to listen on; port 0 picks a free one "
                        "(default: tcp://127.0.0.1:5555)")
    g.add_argument("--server-id", type=int, default=0,
                   help="which server process this is (0..servers-1)")
    g.add_argument("--servers", type=int, default=1, help="server processes in all")
    g.add_argument("--shards-per-server", default=None, metavar="N|auto",
                   help="shards this process serves from one loop, on consecutive ports "
                        "from --bind's (default 1; auto: one per ~2 MB of its parameters)")
    g.add_argument("--mode", default="sync", choices=SERVER_MODES)
    g.add_argument("--workers", type=int, default=2, help="workers that will connect")
    g.add_argument("--staleness", type=int, default=2, help="ssp: staleness bound s")
    g.add_argument("--staleness-lr", action="store_true",
                   help="async: scale the learning rate by 1/(1+staleness)")
    g.add_argument("--push-every", type=int, default=1,
                   help="async: the workers' --push-every (sets the schedule's length)")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="seconds a held reply may wait before it is an error")
    g.add_argument("--metrics", default=None, help="JSON-lines file for the final counters")
    g = p.add_argument_group("model, data and optimizer (as the workers')")
    g.add_argument("--model", default="lenet300")
    g.add_argument("--data", default="digits", help="digits | mnist:DIR | synthetic[:N]")
    g.add_argument("--val-size", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="global batch size")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--optimizer", default=None)
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--schedule", default=None)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--clip-norm", type=float, default=None,
                   help="gradient-norm clip (of this shard's part of the gradient)")
    g.add_argument("--augment", default=None,
                   help="ignored: accepted so the workers' options can be passed as they are")
    add_reliability_options(p)


def run(args: argparse.Namespace) -> int:
    from distnet.cli.train import resolve
    from distnet.dist.job import validate_shards_per_server
    from distnet.dist.server_role import create_group, serve

    config = resolve(args)
    if not 0 <= config["server_id"] < config["servers"]:
        raise ValueError(f"--server-id must be in 0..{config['servers'] - 1}, "
                         f"got {config['server_id']}")
    for key in ("workers", "push_every"):
        if config[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    validate_shards_per_server(config)
    group = create_group(config, index=config["server_id"], num_servers=config["servers"],
                         bind=config["bind"])
    ids = [s.server_id for s in group.servers]
    which = f"shard {ids[0]}" if len(ids) == 1 else f"shards {ids[0]}-{ids[-1]}"
    # scripts read this line to learn the port(s) when --bind asked for port 0; the
    # comma-separated addresses are what workers pass to --server, in this order
    print(f"distnet serve: listening on {','.join(group.addresses)} ({which} of "
          f"{config['servers'] * len(ids)}, {config['mode']}, {config['workers']} workers)",
          flush=True)
    stats = serve(group, config, f"server{config['server_id']}")
    print(f"distnet serve: stopped at version {min(s['version'] for s in stats)} after "
          f"{sum(s['pushes_applied'] for s in stats)} gradients", file=sys.stderr, flush=True)
    reasons = {s.abort_reason for s in group.servers if s.abort_reason}
    if reasons:
        print(f"distnet serve: job aborted: {'; '.join(sorted(reasons))}", file=sys.stderr,
              flush=True)
        return 1
    return 0
