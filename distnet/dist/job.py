"""A distributed job: launch it, give each MPI rank its role, collect the result.

``run_job(config)`` is called by ``distnet train`` for every mode but ``local``:

* outside MPI it writes the settings to ``<run_dir>/job.json`` and re-launches
  itself as ``mpiexec -n RANKS python -m mpi4py -m distnet.dist.entry job.json``,
  then returns what the chief worker wrote to ``<run_dir>/result.json``;
* under MPI (or when one rank is all the job needs) it runs this rank's role:
  ranks ``0..K-1`` host the K parameter servers (each serving ``--shards-per-server``
  shards from one loop) and the others are workers; with ``--colocate`` every rank is
  a worker and ranks ``0..K-1`` also run their server in a thread; with
  ``config["server"]`` (servers started by ``distnet serve``) or in ``allreduce`` mode
  every rank is a worker;
* outside MPI with ``--server`` and ``DISTNET_RANK`` set it runs that one worker
  alone (workers on hosts that share no MPI job, e.g. the network namespaces).

MPI collectives cannot time out, so each one runs under a ``Watchdog`` that ends
the rank, naming what it waited for, when ``config["timeout"]`` passes; ``mpiexec``
then ends the other ranks. An exception on any rank is printed as
``distnet: rank R (ROLE) failed: ...`` and aborts the job (``python -m mpi4py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DIST_MODES = ("sync", "async", "ssp", "allreduce")
# Set by the MPI launchers in every rank: MPICH/Intel (PMI), Open MPI, PMIx.
MPI_ENV = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def under_mpi() -> bool:
    """True in a process started by mpiexec (checked without initialising MPI)."""
    return any(key in os.environ for key in MPI_ENV)


def ranks_needed(config: dict[str, Any]) -> int:
    """MPI ranks of the job: workers, plus the server processes unless the servers run
    elsewhere or inside worker ranks (``colocate``)."""
    workers = int(config["workers"])
    if config["mode"] == "allreduce" or config.get("server") or config.get("colocate"):
        return workers
    return workers + int(config["servers"])


def validate(config: dict[str, Any]) -> None:
    """Raise ValueError, naming the option, for settings no distributed job can run."""
    if config.get("mode") not in DIST_MODES:
        raise ValueError(f"distributed mode must be one of {', '.join(DIST_MODES)}, "
                         f"got {config.get('mode')!r}")
    for key, low in (("workers", 1), ("push_every", 1), ("pull_every", 1), ("staleness", 0),
                     ("batch_size", 1), ("epochs", 0)):
        if int(config[key]) < low:
            raise ValueError(f"--{key.replace('_', '-')} must be >= {low}, got {config[key]}")
    if not config.get("server") and config["mode"] != "allreduce" and int(config["servers"]) < 1:
        raise ValueError(f"--servers must be >= 1, got {config['servers']}")
    if (config.get("colocate") and not config.get("server") and config["mode"] != "allreduce"
            and int(config["servers"]) > int(config["workers"])):
        raise ValueError(f"--colocate puts each server shard in a worker rank: --servers "
                         f"{config['servers']} needs at least as many --workers, got "
                         f"{config['workers']}")
    validate_shards_per_server(config)
    if not float(config["timeout"]) > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {config['timeout']}")


def validate_shards_per_server(config: dict[str, Any]) -> None:
    sps = config.get("shards_per_server")
    if sps not in (None, "auto") and not (str(sps).isdigit() and int(sps) >= 1):
        raise ValueError(f"--shards-per-server must be a number >= 1 or 'auto', got {sps!r}")


def prepare(config: dict[str, Any]) -> dict[str, Any]:
    """A validated copy of ``config`` with its run directory made (once, before launch)."""
    from distnet.rundir import create_run_dir

    if config.get("_prepared"):
        return config
    config = dict(config)
    validate(config)
    create_run_dir(config, config["model"], config["mode"])
    config["_prepared"] = True
    return config


def run_job(config: dict[str, Any]) -> dict[str, Any] | None:
    """Run the distributed job of ``config``; the chief worker's result, None on other ranks."""
    if under_mpi():
        from mpi4py import MPI

        return run_ranks(config, MPI.COMM_WORLD)
    config = prepare(config)
    # ranks print one line per error, as the CLI does, unless `distnet --debug` asked for more
    config.setdefault("_debug", "--debug" in sys.argv)
    if config.get("server") and os.environ.get("DISTNET_RANK") is not None:
        return run_standalone_worker(config, int(os.environ["DISTNET_RANK"]))
    if ranks_needed(config) == 1:
        from mpi4py import MPI

        return run_ranks(config, MPI.COMM_WORLD)
    return launch_job(config)


def launch_job(config: dict[str, Any], entry: list[str] | None = None) -> dict[str, Any]:
    """Start the job's ranks with mpiexec and return the chief worker's result.

    entry: what ranks run after ``python -m mpi4py`` (default ``-m distnet.dist.entry``);
    the job file's path is appended. The job and result files live in the run
    directory, which multi-node runs must have on a shared file system.
    """
    from distnet.dist.launcher import JobFailed, build_command, launch

    config = prepare(config)
    run_dir = Path(config["run_dir"])
    job_file, result_file = run_dir / "job.json", run_dir / "result.json"
    for old in (result_file, *run_dir.glob("error.rank*.txt")):
        old.unlink(missing_ok=True)
    job_file.write_text(json.dumps({**config, "_result_path": str(result_file.resolve())},
                                   indent=1, default=str), encoding="utf-8")
    n = ranks_needed(config)
    cmd = build_command([*(entry or ["-m", "distnet.dist.entry"]), str(job_file.resolve())],
                        n, hostfile=config.get("hostfile"), workdir=run_dir)
    what = f"distnet {config['mode']} job ({n} ranks)"
    try:
        launch(cmd, timeout=config.get("job_timeout"), what=what,
               echo_stderr=not config.get("_quiet"))
    except JobFailed as exc:
        reason = first_failure(run_dir)
        if reason is None:
            raise
        raise JobFailed(f"{what} failed with exit code {exc.returncode}: {reason}",
                        exc.returncode, exc.stderr_tail) from None
    if not result_file.exists():
        raise RuntimeError(f"the job ended without writing its result to {result_file}")
    return json.loads(result_file.read_text(encoding="utf-8"))


class Watchdog:
    """Ends this process when a guarded wait outlasts its timeout (MPI cannot time out).

    ``with watchdog.guard("gradients of step 12 (allreduce)", 120): comm.Allreduce(...)``.
    A guard costs a lock and a notify, so it can wrap every step. On expiry it
    prints the failure and calls ``os._exit``: the waiting thread is stuck inside
    MPI and cannot raise, and mpiexec ends the other ranks when one exits.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self._cond = threading.Condition()
        self._what: str | None = None
        self._timeout = 0.0
        self._deadline = 0.0
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, what: str, timeout: float) -> Iterator[None]:
        with self._cond:
            self._what, self._timeout = what, float(timeout)
            self._deadline = time.monotonic() + float(timeout)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._what = None

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._what is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    sys.stderr.write(f"distnet: rank {self.label} failed: TimeoutError: timed out "
                                     f"after {self._timeout:g}s waiting for {self._what}\n")
                    sys.stderr.flush()
                    os._exit(124)
                self._cond.wait(remaining)


@contextlib.contextmanager
def report_failure(rank: int, role: str, run_dir: str | None = None) -> Iterator[None]:
    """Print one line naming the rank and role of an exception, then let it abort the job.

    The line also goes to ``<run_dir>/error.rank<k>.txt`` (with the traceback): MPI_Abort
    can end mpiexec before it forwards the rank's last stderr, a file always arrives.
    """
    try:
        yield
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        line = f"distnet: rank {rank} ({role}) failed: {type(exc).__name__}: {exc}"
        print(line, file=sys.stderr, flush=True)
        if run_dir:
            with contextlib.suppress(OSError):  # atomic: the launcher may read it any time
                _write_atomic(Path(run_dir, f"error.rank{rank}.txt"),
                              line + "\n\n" + traceback.format_exc())
        raise


def first_failure(run_dir: str | Path) -> str | None:
    """The line of the earliest ``error.rank<k>.txt`` in ``run_dir`` (the rank that failed
    first; the others usually fail because of it), or None."""
    files = sorted(Path(run_dir).glob("error.rank*.txt"), key=lambda f: f.stat().st_mtime_ns)
    for f in files:
        with contextlib.suppress(OSError, IndexError):  # gone, or empty: look at the next
            return f.read_text(encoding="utf-8").splitlines()[0]
    return None


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the whole file or none of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_result(config: dict[str, Any], result: dict[str, Any] | None) -> None:
    """The chief's result as ``<run_dir>/result.json`` (or ``_result_path``), written
    atomically: the launching process never reads half a file."""
    if result is None:
        return
    path = Path(config.get("_result_path") or Path(config["run_dir"]) / "result.json")
    _write_atomic(path, json.dumps(result, indent=1, default=str))


def run_ranks(config: dict[str, Any], comm: Any) -> dict[str, Any] | None:
    """This rank's role in the job; returns the result on the chief worker, else None."""
    config, result = _run_role(config, comm)
    with report_failure(comm.rank, "chief worker", config.get("run_dir")):
        write_result(config, result)
    return result


def _run_role(config: dict[str, Any], comm: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The job's settings as rank 0 resolved them, and this rank's result."""
    rank, size = comm.rank, comm.size
    watchdog = Watchdog(str(rank))
    timeout = float(config["timeout"])
    with report_failure(rank, "setup", config.get("run_dir")):
        if rank == 0:
            config = prepare(config)  # rank 0 names the run dir for everyone
        own_dir = config.get("run_dir")
        with watchdog.guard("the job settings from rank 0", timeout):
            config = dict(comm.bcast(config, root=0))
        if rank != 0:
            _drop_unused_run_dir(own_dir, config["run_dir"])
        external = [a.strip() for a in str(config.get("server") or "").split(",") if a.strip()]
        n_servers = 0 if config["mode"] == "allreduce" or external else int(config["servers"])
        colocate = bool(config.get("colocate")) and n_servers > 0
        first_worker = 0 if colocate else n_servers  # the rank of worker 0
        least = max(n_servers, 1) if colocate else n_servers + 1
        if size < least:
            how = " co-located with workers" if colocate else ""
            raise ValueError(f"{size} ranks cannot host {n_servers} servers{how} and any "
                             f"worker: start at least {least} ranks")
        if size - first_worker != int(config["workers"]) and rank == 0:
            print(f"distnet: note: {size} ranks give {size - first_worker} workers "
                  f"(--workers {config['workers']} ignored)", file=sys.stderr, flush=True)
        config["workers"] = size - first_worker
        is_server, is_worker = rank < n_servers, rank >= first_worker
        with watchdog.guard("the host names of all ranks", timeout):
            hosts = comm.allgather(socket.gethostname())
            sub = comm.Split(0 if is_worker else 1, rank)
    role = f"worker {rank - first_worker}" if is_worker else f"server {rank}"
    with report_failure(rank, role, config["run_dir"]):
        if config["mode"] == "allreduce":
            from distnet.dist.allreduce import run_allreduce_worker

            return config, run_allreduce_worker(config, sub, watchdog)
        server = None
        if is_server:
            from distnet.dist.server_role import create_group

            server = create_group(config, index=rank, num_servers=n_servers,
                                  host=advertised_host(len(set(hosts)) > 1))
        with watchdog.guard("the addresses of the parameter servers", timeout):
            shards = comm.allgather(server.addresses if server is not None else [])
        addresses = external or [a for shard_list in shards for a in shard_list]
        if server is not None and not is_worker:
            from distnet.dist.server_role import serve

            serve(server, config, rank)
            return config, None
        if server is not None:
            return config, _colocated(config, server, addresses, rank)
        from distnet.dist.worker import run_worker

        return config, run_worker(config, addresses, worker_id=rank - first_worker, rank=rank)


def _colocated(config: dict[str, Any], group: Any, addresses: list[str],
               rank: int) -> dict[str, Any] | None:
    """Worker ``rank`` with server process ``rank``'s shards in a thread of the same
    process; the worker reaches them over inproc:// (by reference: no copy, no I/O
    thread) and the other ranks' shards over TCP. They serve until the chief's shutdown."""
    from distnet.dist.server_role import serve
    from distnet.dist.worker import run_worker

    local = dict(zip(group.addresses, group.bind_local(), strict=True))
    thread = threading.Thread(target=serve, args=(group, config, rank),
                              kwargs={"label": f"rank{rank}-server"},
                              name=f"ps-server-{rank}", daemon=True)
    thread.start()
    try:
        mine = [local.get(a) or a for a in addresses]
        result = run_worker(config, mine, worker_id=rank, rank=rank)
    except BaseException:
        group.stop(join_timeout=0)
        raise
    thread.join(float(config["timeout"]))
    if thread.is_alive():
        group.stop()
        raise TimeoutError(f"the server shards of rank {rank} did not stop within "
                           f"{config['timeout']} s of its worker's end (waiting for the "
                           "chief's shutdown)")
    return result


def _drop_unused_run_dir(own: str | None, used: str) -> None:
    """Remove the run directory this rank made before it learnt rank 0's (``distnet train``
    under mpiexec names one per process), if it holds nothing but its config.toml."""
    if not own or Path(own).resolve() == Path(used).resolve():
        return
    path = Path(own)
    if path.is_dir() and {p.name for p in path.iterdir()} <= {"config.toml"}:
        (path / "config.toml").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.rmdir()


def run_standalone_worker(config: dict[str, Any], worker_id: int) -> dict[str, Any] | None:
    """One worker outside MPI, against servers given by ``--server`` (``distnet serve``)."""
    from distnet.dist.worker import run_worker

    addresses = [a.strip() for a in str(config["server"]).split(",") if a.strip()]
    if not 0 <= worker_id < int(config["workers"]):
        raise ValueError(f"DISTNET_RANK={worker_id} is not a worker of --workers "
                         f"{config['workers']} (expected 0..{int(config['workers']) - 1})")
    with report_failure(worker_id, f"worker {worker_id}", config["run_dir"]):
        result = run_worker(config, addresses, worker_id=worker_id)
    write_result(config, result)
    return result


def advertised_host(multi_node: bool) -> str:
    """The address a server shard binds and gives workers.

    ``$DISTNET_HOST`` when set (hosts with several interfaces, namespaces sharing a
    host name); else loopback when the job is on one host, else the address this
    host's name resolves to.
    """
    if os.environ.get("DISTNET_HOST"):
        return os.environ["DISTNET_HOST"]
    return socket.gethostbyname(socket.gethostname()) if multi_node else "127.0.0.1"
