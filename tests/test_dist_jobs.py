"""Distributed jobs end to end (real mpiexec on 127.0.0.1), and the launcher library.

The ``mpi`` tests start real processes: ``distnet train`` re-launching itself under
mpiexec, ``launch/local.sh``, ``distnet serve``. Data are small synthetic clusters
(8x8 "images") and the model is lenet300, so each job takes a few seconds even
with 5 ranks on 2 cores. Every subprocess has a timeout and runs in its own
process group, which is killed afterwards whatever happened.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from procs import run

from distnet.dist import launcher

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# 500 clusters, 114 held out: 386 training examples = 6 batches of 64 and one of 2, so
# with 4 workers the last global batch leaves two workers with an empty slice.
DATA = ["--data", "synthetic:500", "--val-size", "114", "--augment", "none", "--no-progress",
        "--timeout", "60"]
# the lenet300 recipe (momentum, weight decay) with a warm-up and a cosine schedule
EQUIV = [*DATA, "--epochs", "1", "--batch-size", "64", "--schedule", "cosine",
         "--warmup-steps", "3"]
# 1,000 validation examples, so that 0.5 points is 5 of them (with DATA's 114, one example
# was 0.9 points and the comparison with sync failed one run in five)
CONVERGE = ["--data", "synthetic:3000", "--val-size", "1000", "--augment", "none",
            "--no-progress", "--timeout", "60", "--epochs", "3", "--batch-size", "48",
            "--optimizer", "sgd", "--lr", "0.1", "--schedule", "constant", "--warmup-steps", "0"]


def train(run_dir: Path, *args: str, timeout: float = 120) -> tuple[dict, dict]:
    """``distnet train ARGS --run-dir RUN_DIR``: the result and the final parameters."""
    run([PY, "-m", "distnet.cli.main", "train", *args, "--run-dir", str(run_dir)], timeout)
    return read_run(run_dir)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line ``proc`` prints, waiting at most ``timeout`` seconds for it."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"no output from {proc.args[:5]} within {timeout}s")
    return proc.stdout.readline()


def read_run(run_dir: Path) -> tuple[dict, dict]:
    result = json.loads((run_dir / "result.json").read_text())
    with np.load(run_dir / "model.npz", allow_pickle=False) as f:
        params = {k: f[k] for k in f.files if k.startswith("model/")}
    return result, params


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:  # float32 sums in another order: a few ulps
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


def worker_records(run_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(run_dir.glob("metrics.rank*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r.get("role") == "worker" and r.get("kind") == "step"]


@pytest.fixture(scope="module")
def sync_runs(tmp_path_factory, mpiexec) -> dict[int, tuple[dict, dict]]:
    """Sync mode with 1, 2 and 4 workers, same seed and global batch."""
    base = tmp_path_factory.mktemp("sync")
    return {w: train(base / f"w{w}", "--mode", "sync", "--workers", str(w), *EQUIV)
            for w in (1, 2, 4)}


@pytest.fixture(scope="module")
def converge_runs(tmp_path_factory, mpiexec) -> dict[str, tuple[dict, dict, Path]]:
    base = tmp_path_factory.mktemp("converge")
    runs = {}
    for mode in ("sync", "async", "ssp"):
        d = base / mode
        runs[mode] = (*train(d, "--mode", mode, "--workers", "3", "--staleness", "1",
                             *CONVERGE), d)
    return runs


# ---- parameter-server and allreduce jobs ------------------------------------------------
@pytest.mark.mpi
def test_sync_equals_for_1_2_4_workers(sync_runs):
    (r1, p1), (r2, p2), (r4, p4) = sync_runs[1], sync_runs[2], sync_runs[4]
    assert (r1["workers"], r2["workers"], r4["workers"]) == (1, 2, 4)
    assert r1["server_version"] == r2["server_version"] == r4["server_version"] == 7
    assert_same_params(p1, p2)
    assert_same_params(p1, p4)


@pytest.mark.mpi
def test_sync_equals_local_training(sync_runs, tmp_path):
    """One sync worker behind a server trains exactly as a single process does."""
    done = run([PY, "-m", "distnet.cli.main", "train", "--mode", "local", *EQUIV,
                "--run-dir", str(tmp_path)])
    with np.load(tmp_path / "model.npz", allow_pickle=False) as f:
        params = {k: f[k] for k in f.files if k.startswith("model/")}
    assert_same_params(params, sync_runs[1][1])
    accuracy = 100 * sync_runs[1][0]["val_accuracy"]
    assert f"accuracy: {accuracy:.2f}%" in done.stdout


@pytest.mark.mpi
def test_two_servers_equal_one(sync_runs, tmp_path):
    result, params = train(tmp_path, "--mode", "sync", "--workers", "2", "--servers", "2",
                           *EQUIV)
    assert len(result["server_stats"]) == 2
    assert all(s["param_bytes"] > 0 for s in result["server_stats"])  # both hold a share
    assert_same_params(params, sync_runs[2][1])


@pytest.mark.mpi
def test_colocated_shard_groups_equal_one_server(sync_runs, tmp_path):
    """--colocate --servers 2 --shards-per-server 2: two ranks in all, each a worker with
    a thread serving two shards (its own worker over inproc://); same parameters."""
    result, params = train(tmp_path, "--mode", "sync", "--workers", "2", "--servers", "2",
                           "--shards-per-server", "2", "--colocate", "--metrics",
                           str(tmp_path / "metrics.jsonl"), *EQUIV)
    assert [s["server_id"] for s in result["server_stats"]] == [0, 1, 2, 3]
    assert all(s["param_bytes"] > 0 and s["version"] == 7 for s in result["server_stats"])
    assert_same_params(params, sync_runs[2][1])
    assert sorted(p.name for p in tmp_path.glob("metrics.rank*.jsonl")) == [
        "metrics.rank0-server.jsonl", "metrics.rank0.jsonl", "metrics.rank1-server.jsonl",
        "metrics.rank1.jsonl"]
    shards = [json.loads(line) for line in (tmp_path / "metrics.rank1-server.jsonl")
              .read_text().splitlines()]
    assert [r["server_id"] for r in shards] == [2, 3]


def test_colocate_needs_a_worker_for_each_server(tmp_path):
    from distnet.dist.job import validate

    config = {"mode": "sync", "workers": 1, "servers": 2, "colocate": True, "push_every": 1,
              "pull_every": 1, "staleness": 0, "batch_size": 8, "epochs": 1, "timeout": 5}
    with pytest.raises(ValueError, match="--servers 2 needs at least as many --workers"):
        validate(config)
    with pytest.raises(ValueError, match="--shards-per-server must be a number >= 1 or 'auto'"):
        validate({**config, "workers": 2, "shards_per_server": "0"})
    validate({**config, "workers": 2, "shards_per_server": "auto"})


@pytest.mark.mpi
def test_allreduce_equals_sync(sync_runs, tmp_path):
    result, params = train(tmp_path, "--mode", "allreduce", "--workers", "2", *EQUIV)
    assert result["mode"] == "allreduce"
    assert_same_params(params, sync_runs[2][1])
    assert any("allreduce_ms" in r for r in worker_records(tmp_path))


@pytest.mark.mpi
@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_async_and_ssp_converge(converge_runs, mode):
    sync_acc = converge_runs["sync"][0]["val_accuracy"]
    acc = converge_runs[mode][0]["val_accuracy"]
    assert acc >= 0.95, f"{mode} reached only {acc:.3f}"
    assert acc >= sync_acc - 0.005, f"{mode} {acc:.3f} vs sync {sync_acc:.3f}"


@pytest.mark.mpi
def test_ssp_bound_never_exceeded(converge_runs):
    result, _, run_dir = converge_runs["ssp"]
    bound = 1
    assert result["server_stats"][0]["mode"] == "ssp"
    assert result["max_staleness"] <= bound  # the server's largest clock gap answered
    rows = worker_records(run_dir)
    assert {r["worker"] for r in rows} == {0, 1, 2}
    assert max(r["staleness"] for r in rows) <= bound
    # every worker wrote its communication figures
    assert all({"bytes_sent", "bytes_received", "clock_wait_ms"} <= r.keys() for r in rows)


@pytest.mark.mpi
def test_launcher_script_runs_the_same_job(sync_runs, tmp_path):
    """launch/local.sh: every rank runs `distnet train` under mpiexec itself."""
    run(["bash", str(ROOT / "launch" / "local.sh"), "-n", "3", "--mode", "sync",
         "--workers", "2", *EQUIV, "--run-dir", str(tmp_path)], timeout=120,
        env={"PYTHON": PY})
    _, params = read_run(tmp_path)
    assert_same_params(params, sync_runs[2][1])
    assert sorted(p.name for p in tmp_path.glob("metrics.rank*.jsonl")) == [
        "metrics.rank0.jsonl", "metrics.rank1.jsonl", "metrics.rank2.jsonl"]


@pytest.mark.mpi
@pytest.mark.parametrize("shards", [1, 3])
def test_external_server(sync_runs, tmp_path, shards):
    """`distnet serve` on free ports (one per shard), then two MPI workers with --server."""
    serve = subprocess.Popen(
        [PY, "-m", "distnet.cli.main", "serve", "--bind", "tcp://127.0.0.1:0", "--mode", "sync",
         "--workers", "2", "--shards-per-server", str(shards),
         *[a for a in EQUIV if a != "--no-progress"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        line = read_line(serve, timeout=60)  # "distnet serve: listening on tcp://..."
        assert "listening on" in line, line
        address = line.split()[4]
        assert address.count("tcp://") == shards
        result, params = train(tmp_path, "--mode", "sync", "--workers", "2", "--server",
                               address, *EQUIV)
        assert len(result["server_stats"]) == shards
        assert serve.wait(timeout=30) == 0  # the chief shut it down
    finally:
        launcher.kill_group(serve)
    assert_same_params(params, sync_runs[2][1])


FAULTY_ENTRY = """\
import sys, time
from distnet.dist import updates
from distnet.dist.entry import main

original = updates.SyncUpdate.step

def faulty(self, step):
    if self.client.worker_id == 1 and step == 2:
        {fault}
    return original(self, step)

updates.SyncUpdate.step = faulty
sys.exit(main())
"""


def launch_faulty_job(tmp_path: Path, fault: str, timeout: float) -> tuple[str, float]:
    """A 3-worker sync job whose worker 1 runs ``fault`` at step 2: the error message
    and how long the job took to end."""
    from distnet.cli.main import build_parser
    from distnet.cli.train import resolve
    from distnet.dist.job import launch_job

    script = tmp_path / "faulty_entry.py"
    script.write_text(FAULTY_ENTRY.format(fault=fault))
    _, subparsers = build_parser()
    args = subparsers["train"].parse_args(["--mode", "sync", "--workers", "3", *EQUIV,
                                           "--run-dir", str(tmp_path / "run")])
    config = {**resolve(args), "timeout": timeout, "job_timeout": 90.0, "_quiet": True}
    t0 = time.monotonic()
    with pytest.raises(launcher.JobFailed) as info:
        launch_job(config, entry=[str(script)])
    assert info.value.returncode != 0
    return str(info.value), time.monotonic() - t0


@pytest.mark.mpi
def test_exception_in_one_rank_ends_the_job(tmp_path, mpiexec):
    # peers would wait 300 s: only the abort, not a timeout, can end the job quickly
    message, seconds = launch_faulty_job(
        tmp_path, 'raise RuntimeError("injected failure at step 2")', timeout=300)
    assert seconds < 60
    assert "rank 2 (worker 1) failed: RuntimeError: injected failure at step 2" in message


@pytest.mark.mpi
def test_a_stalled_worker_times_out_naming_what_was_awaited(tmp_path, mpiexec):
    message, seconds = launch_faulty_job(tmp_path, "time.sleep(120)", timeout=3)
    assert seconds < 60
    assert "failed: PSError" in message
    assert "timed out after 3 s waiting for gradients from workers [1]" in message


def test_watchdog_ends_a_stuck_wait_and_names_it():
    code = ("import time\nfrom distnet.dist.job import Watchdog\n"
            "with Watchdog('7').guard('the allreduce of step 3', 0.5):\n    time.sleep(30)\n")
    done = run([PY, "-c", code], timeout=30, check=False)
    assert done.returncode == 124
    assert ("distnet: rank 7 failed: TimeoutError: timed out after 0.5s waiting for "
            "the allreduce of step 3") in done.stderr


def test_first_failure_skips_a_file_still_being_written(tmp_path):
    """A rank killed while it wrote its error file must not hide the others' reasons
    (CI once saw an IndexError here instead of the job's error)."""
    from distnet.dist.job import first_failure, report_failure

    assert first_failure(tmp_path) is None
    (tmp_path / "error.rank3.txt").write_text("")  # the earliest, and empty
    time.sleep(0.01)
    with pytest.raises(RuntimeError), report_failure(1, "worker 0", str(tmp_path)):
        raise RuntimeError("the real reason")
    assert first_failure(tmp_path) == ("distnet: rank 1 (worker 0) failed: RuntimeError: "
                                       "the real reason")
    # written atomically: no temporary file is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["error.rank1.txt", "error.rank3.txt"]


# ---- the launcher library (no MPI) ------------------------------------------------------
def test_parse_hostfile_formats():
    text = """
    # comment
    node1 slots=4   # trailing comment
    node2 slots=2 max_slots=8
    10.0.0.3
    node4:3
    """
    hosts = launcher.parse_hostfile(text)
    assert hosts == [launcher.Host("node1", 4), launcher.Host("node2", 2),
                     launcher.Host("10.0.0.3", 1), launcher.Host("node4", 3)]
    assert launcher.format_hostfile(hosts[:2], "mpich") == "node1:4\nnode2:2\n"
    assert launcher.format_hostfile(hosts[:2], "openmpi") == "node1 slots=4\nnode2 slots=2\n"
    assert launcher.read_hostfile(ROOT / "cluster" / "hosts")[0] == launcher.Host("10.77.0.1", 1)


@pytest.mark.parametrize("text, error", [
    ("node1 slots=0", "positive integer"), ("node1 slots=x", "positive integer"),
    ("node1 cpus=2", "expected 'host slots=N'"), ("a slots=1\na slots=2", "listed twice"),
    ("# nothing\n", "no hosts"),
])
def test_parse_hostfile_rejects(text, error):
    with pytest.raises(ValueError, match=error):
        launcher.parse_hostfile(text, "hosts")


def test_build_command_mpich(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=2\nb slots=2\n")
    cmd = launcher.build_command(["-m", "distnet.dist.entry", "job.json"], 4, hostfile=hostfile,
                                 env={"DISTNET_DEVICE": "cpu"}, mpiexec="/x/mpiexec",
                                 flavor="mpich", python="/x/python", workdir=tmp_path)
    assert cmd[:3] == ["/x/mpiexec", "-n", "4"]
    f = cmd.index("-f")
    assert Path(cmd[f + 1]).read_text() == "a:2\nb:2\n"
    assert cmd[cmd.index("-genv"):cmd.index("-genv") + 3] == ["-genv", "DISTNET_DEVICE", "cpu"]
    assert cmd[-6:] == ["/x/python", "-m", "mpi4py", "-m", "distnet.dist.entry", "job.json"]


def test_build_command_openmpi(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=1\n")
    cmd = launcher.build_command(["x.py"], 3, hostfile=hostfile, mpiexec="mpirun",
                                 flavor="openmpi", python="py",
                                 env={"OMP_NUM_THREADS": "1", "PYTHONPATH": "/src"})
    assert cmd[cmd.index("--hostfile") + 1] == str(hostfile)
    assert "--oversubscribe" in cmd  # 3 ranks on 1 slot
    assert ["-x", "OMP_NUM_THREADS=1"] == cmd[cmd.index("-x"):cmd.index("-x") + 2]
    assert "-x" in cmd and "PYTHONPATH=/src" in cmd
    assert (os.geteuid() == 0) == ("--allow-run-as-root" in cmd)
    assert cmd[-4:] == ["py", "-m", "mpi4py", "x.py"]


def test_rank_environment_passes_paths_and_limits_threads():
    env = launcher.rank_environment(4, base={"DISTNET_DEVICE": "cpu", "HOME": "/root",
                                             "PYTHONPATH": "/elsewhere"})
    assert env["DISTNET_DEVICE"] == "cpu" and "HOME" not in env
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    assert int(env["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 4)
    assert launcher.rank_environment(1, base={"OMP_NUM_THREADS": "7"})["OMP_NUM_THREADS"] == "7"


def test_flavor_and_rank_count():
    assert launcher.flavor_from_version("HYDRA build details:\n Version: 5.0") == "mpich"
    assert launcher.flavor_from_version("mpirun (Open MPI) 4.1.5") == "openmpi"
    with pytest.raises(RuntimeError, match="unrecognised"):
        launcher.flavor_from_version("something else")
    assert launcher._train_ranks(["--mode", "sync", "--workers", "3", "--servers", "2"]) == 5
    assert launcher._train_ranks(["--mode", "allreduce", "--workers", "3"]) == 3
    assert launcher._train_ranks(["--mode", "sync", "--server", "tcp://h:1"]) == 2
    assert launcher._train_ranks(["--mode", "sync", "--workers", "3", "--servers", "2",
                                  "--colocate"]) == 3
    # a job file's workers/servers/colocate count too (they were ignored: 3 ranks for 5)
    jobs = ROOT / "cluster" / "jobs"
    assert launcher._train_ranks(["--config", str(jobs / "two-servers.toml")]) == 5
    assert launcher._train_ranks(["--config", str(jobs / "one-host.toml")]) == 2
    assert launcher._train_ranks(["--config", str(jobs / "one-host.toml"), "--workers",
                                  "3"]) == 3


def test_failure_message_names_the_rank():
    tail = ("noise\r\nTraceback...\ndistnet: rank 3 (worker 2) failed: ValueError: bad\n"
            "Abort(1) on node 3\n")
    assert launcher.failure_message("job", 1, tail) == (
        "job failed with exit code 1: distnet: rank 3 (worker 2) failed: ValueError: bad")
    assert "no error message" in launcher.failure_message("job", 9, "")


def test_launch_kills_the_group_on_timeout(tmp_path):
    marker = tmp_path / "child.pid"
    script = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    cmd = ["bash", "-c", f"{PY} -c \"{script}\" & wait"]
    with pytest.raises(TimeoutError, match="timed out after 2s waiting for the test job"):
        launcher.launch(cmd, timeout=2, what="test job", echo_stderr=False)
    pid = int(marker.read_text())
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the grandchild outlived the launch timeout"


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.mpi
def test_shared_memory_off_gives_the_same_parameters(sync_runs, tmp_path):
    """Workers on the server's host use its /dev/shm segment by default (only headers, on
    the same-host channel, not ZeroMQ); --no-shared-memory sends every array as frames by
    ZeroMQ. Same parameters, bit for bit."""
    default = sync_runs[2][0]["server_stats"][0]
    assert default["shm_gradients"] == 2 * default["version"] and default["shared_memory"]
    assert default["local_requests"] >= 2 * default["version"]  # + the first pulls
    result, params = train(tmp_path, "--mode", "sync", "--workers", "2", "--no-shared-memory",
                           *EQUIV)
    stats = result["server_stats"][0]
    assert stats["shm_gradients"] == 0 and stats["bytes_in"] > stats["param_bytes"] * 7
    for key, value in params.items():  # the same sums in the same order
        np.testing.assert_array_equal(value, sync_runs[2][1][key], err_msg=key)
