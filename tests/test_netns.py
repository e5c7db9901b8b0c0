"""A parameter server and two workers on three "hosts" (network namespaces), over real TCP.

``cluster/netns.sh up`` builds the namespaces (server 10.77.0.1, workers 10.77.0.2 and
10.77.0.3, joined by a bridge in a fourth namespace or by one veth pair per worker,
1 Gbit/s token-bucket links). The server
is ``distnet serve`` in the server namespace; the workers are standalone
``distnet train --server`` processes (``DISTNET_RANK`` gives their ids) in the other
two. The namespaces have no route anywhere else, so every byte crosses the veths.
Needs root and a working ``ip netns``; skipped otherwise. Torn down in a finally.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distnet.dist.launcher import kill_group

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[1]
NETNS = ROOT / "cluster" / "netns.sh"
PY = sys.executable
JOB = ["--data", "synthetic:600", "--val-size", "120", "--epochs", "3", "--batch-size", "48",
       "--optimizer", "sgd", "--lr", "0.1", "--schedule", "constant", "--warmup-steps", "0",
       "--augment", "none", "--timeout", "60"]


def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"dnprobe{os.getpid()}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns does not work here: {exc}"
    if made.returncode != 0:
        return f"ip netns does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return None


def netns(*args: str, prefix: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(NETNS), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "DN_PREFIX": prefix,
                                                "PYTHON": PY})


@pytest.fixture(params=["bridge", "pairwise"])
def cluster(request):
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    prefix = f"dt{os.getpid() % 10000}"  # unique per test run, short enough for interfaces
    try:
        up = netns("up", "--rate", "1gbit", "--topology", request.param, prefix=prefix)
        assert up.returncode == 0, up.stdout + up.stderr
        yield prefix
    finally:
        down = netns("down", prefix=prefix)
        assert down.returncode == 0, down.stderr


def start_in(prefix: str, host: str, args: list[str], env: dict[str, str] | None = None,
             ) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", f"{prefix}-{host}", PY, "-m",
                             "distnet.cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            start_new_session=True)


def test_server_and_two_workers_across_namespaces(cluster, tmp_path):
    prefix = cluster
    keys = tmp_path / "keys"
    from distnet.cli.main import main

    # Off loopback the server only accepts listed CURVE keys: the real multi-host setup.
    assert main(["keygen", "--dir", str(keys), "--clients", "2"]) == 0
    procs: list[subprocess.Popen] = []
    try:
        server = start_in(prefix, "server", ["serve", "--bind", "tcp://10.77.0.1:0", "--mode",
                                             "sync", "--workers", "2", "--keys", str(keys),
                                             *JOB])
        procs.append(server)
        ready, _, _ = select.select([server.stdout], [], [], 60)
        assert ready, "the server printed nothing within 60 s"
        line = server.stdout.readline()
        assert "listening on tcp://10.77.0.1:" in line, line + server.stderr.read()
        address = line.split()[4]
        for rank, host in enumerate(("w1", "w2")):
            procs.append(start_in(prefix, host, [
                "train", "--mode", "sync", "--workers", "2", "--server", address, *JOB,
                "--keys", str(keys), "--run-dir", str(tmp_path), "--no-progress"],
                env={"DISTNET_RANK": str(rank)}))
        for p in procs[1:]:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, f"worker failed:\n{err[-3000:]}"
        assert server.wait(timeout=30) == 0  # the chief shut it down
    finally:
        for p in procs:
            kill_group(p)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["workers"] == 2 and result["mode"] == "sync"
    assert result["val_accuracy"] >= 0.9
    stats = result["server_stats"][0]
    assert stats["registered"] == [0, 1] and stats["bytes_in"] > 1_000_000
    assert (tmp_path / "metrics.rank0.jsonl").exists()
    assert (tmp_path / "metrics.rank1.jsonl").exists()


def test_skips_with_a_reason_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert netns_unavailable() == "needs root for network namespaces"
