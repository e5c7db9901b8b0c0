"""Create CURVE keys for a parameter-server cluster: one server pair, one pair per worker.

Writes DIR/server.key (public: copy to every worker host), DIR/server.key_secret
(the server host only), and DIR/clients/NAME.key (public: the server accepts
exactly these) with DIR/clients/NAME.key_secret (that worker's host only). Workers
are named worker0..workerN-1 (their worker ids) unless --names says otherwise.
Secret files are made readable by their owner only. Existing keys are kept unless
--force; adding --clients to a directory that has a server key only adds workers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

EXAMPLES = """\
  distnet keygen --dir cluster/keys --clients 4       # server + worker0..worker3
  distnet keygen --dir cluster/keys --names alice,bob # server + alice, bob
  distnet serve --keys cluster/keys --bind tcp://0.0.0.0:5555 ...
  distnet train --keys cluster/keys --server tcp://10.77.0.1:5555 ...
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("keys")
    g.add_argument("--dir", required=True, help="directory to write the keys into")
    who = g.add_mutually_exclusive_group()
    who.add_argument("--clients", type=int, default=None,
                     help="worker key pairs to create, named worker0..workerN-1")
    who.add_argument("--names", default=None, help="comma-separated worker key names")
    g.add_argument("--force", action="store_true", help="replace keys that exist already")


def client_names(clients: int | None, names: str | None) -> list[str]:
    """The worker key names asked for (``--clients N`` or ``--names a,b``)."""
    if names is not None:
        out = [n.strip() for n in names.split(",") if n.strip()]
        bad = [n for n in out if not n.replace("-", "").replace("_", "").isalnum()]
        if bad or not out:
            raise ValueError(f"--names must be letters, digits, '-' or '_', comma-separated; "
                             f"got {names!r}")
        if len(set(out)) != len(out):
            raise ValueError(f"--names repeats a name: {names!r}")
        return out
    if clients is not None and clients < 0:
        raise ValueError(f"--clients must be >= 0, got {clients}")
    return [f"worker{i}" for i in range(clients or 0)]


def _create(directory: Path, name: str, force: bool) -> tuple[Path, bool]:
    """``name``'s key pair in ``directory``; (its public key file, whether it was made)."""
    import zmq.auth

    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if public.exists() or secret.exists():
        if not force:
            return public, False
        public.unlink(missing_ok=True)
        secret.unlink(missing_ok=True)
    zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)  # a secret key is a password: its owner alone may read it
    return public, True


def run(args: argparse.Namespace) -> int:
    import zmq

    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support: no keys can be made")
    names = client_names(args.clients, args.names)
    root = Path(args.dir)
    clients = root / "clients"
    clients.mkdir(parents=True, exist_ok=True)
    made, kept = [], []
    path, new = _create(root, "server", args.force)
    (made if new else kept).append(path)
    for name in names:
        path, new = _create(clients, name, args.force)
        (made if new else kept).append(path)
    for p in made:
        print(f"created {p} and {p.name}_secret")
    for p in kept:
        print(f"kept    {p} (exists; --force replaces it)")
    print(f"server host: {root}/server.key_secret and {clients}/*.key; worker NAME: "
          f"{root}/server.key and {clients}/NAME.key_secret")
    return 0
