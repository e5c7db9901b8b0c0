"""Starting MPI jobs: the mpiexec command, hostfiles, and a supervised launch.

A library first (``build_command``, ``parse_hostfile``, ``launch``), with a thin CLI
over it, as Horovod's ``runner/mpi_run.py``::

    python -m distnet.dist.launcher -n 4 --mode sync --workers 3 --data digits
    python -m distnet.dist.launcher --hostfile cluster/hosts --mode async ...

Every rank runs Python as ``python -m mpi4py ...``: mpi4py then calls ``MPI_Abort``
on an uncaught exception, so one failing rank ends the whole job instead of leaving
the others blocked in a collective forever.

Hostfiles use the ``host slots=N`` format shared by mpirun, Horovod and DeepSpeed.
MPICH's hydra reads ``host:N`` lines (``-f``), Open MPI reads ours (``--hostfile``);
``build_command`` writes what the detected MPI wants.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

# Passed to every rank when set here: where distnet is imported from, its device,
# and the allocator/threading knobs that PERF-NOTES.md measures.
PASS_THROUGH = ("PYTHONPATH", "DISTNET_DEVICE", "DISTNET_HOST", "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_",
                "MALLOC_TRIM_THRESHOLD_", "CUDA_VISIBLE_DEVICES")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Host:
    """One line of a hostfile: a host name (or address) and how many ranks it takes."""

    name: str
    slots: int = 1


def parse_hostfile(text: str, source: str = "hostfile") -> list[Host]:
    """Hosts of a ``host slots=N`` hostfile (``#`` comments and blank lines ignored).

    Also accepts hydra's ``host:N`` and a bare ``host`` (one slot). Raises ValueError
    naming the line for anything else, a non-positive slot count or a repeated host.
    """
    hosts: list[Host] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        fields = line.split()
        name, slots = fields[0], "1"
        if ":" in name and len(fields) == 1:
            name, slots = name.rsplit(":", 1)
        for field in fields[1:]:
            key, sep, value = field.partition("=")
            if key == "slots" and sep:
                slots = value
            elif key == "max_slots" and sep:  # Open MPI's cap; irrelevant to the rank count
                continue
            else:
                raise ValueError(f"{where}: expected 'host slots=N', got {raw.strip()!r}")
        if not slots.isdigit() or int(slots) < 1:
            raise ValueError(f"{where}: slots must be a positive integer, got {slots!r}")
        if name in seen:
            raise ValueError(f"{where}: host {name!r} is listed twice")
        seen.add(name)
        hosts.append(Host(name, int(slots)))
    if not hosts:
        raise ValueError(f"{source}: no hosts listed")
    return hosts


def read_hostfile(path: str | Path) -> list[Host]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"hostfile not found: {path}")
    return parse_hostfile(file.read_text(encoding="utf-8"), str(path))


def format_hostfile(hosts: list[Host], flavor: str) -> str:
    """The hostfile text that ``flavor`` (``mpich`` or ``openmpi``) reads."""
    if flavor == "mpich":
        return "".join(f"{h.name}:{h.slots}\n" for h in hosts)
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


def find_mpiexec() -> str:
    """mpiexec next to this Python (the ``mpich`` wheel puts it there), else on PATH."""
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        if (here / name).exists():
            return str(here / name)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("mpiexec not found next to Python or on PATH: "
                            "pip install mpich (or distnet[mpich])")


@functools.lru_cache(maxsize=8)
def mpi_flavor(mpiexec: str) -> str:
    """``mpich`` (hydra; also Intel MPI) or ``openmpi``, from ``mpiexec --version``."""
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"could not run '{mpiexec} --version': {exc}") from None
    return flavor_from_version(out.stdout + out.stderr)


def flavor_from_version(text: str) -> str:
    lower = text.lower()
    if "open mpi" in lower or "openrte" in lower or "open-mpi" in lower:
        return "openmpi"
    if "hydra" in lower or "mpich" in lower or "intel" in lower:
        return "mpich"
    raise RuntimeError(f"unrecognised MPI launcher (neither MPICH hydra nor Open MPI): "
                       f"{text.strip()[:200]!r}")


def rank_environment(n_local: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """Variables to pass to every rank: PASS_THROUGH ones that are set, and thread counts.

    BLAS thread pools default to one thread per core in *every* rank; with several
    ranks on a few cores they fight each other, so each rank gets cores/ranks threads
    unless the user chose a number.
    """
    base = dict(os.environ if base is None else base)
    env = {k: base[k] for k in PASS_THROUGH if k in base}
    # ranks import this very distnet, even when it is not installed where they run
    root = str(Path(__file__).resolve().parents[2])
    paths = env.get("PYTHONPATH", "").split(os.pathsep) if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([root, *[q for q in paths if q != root]])
    threads = str(max(1, (os.cpu_count() or 1) // max(1, n_local)))
    for key in THREAD_VARS:
        env.setdefault(key, threads)
    return env


def build_command(argv: list[str], n: int, *, hostfile: str | Path | None = None,
                  env: dict[str, str] | None = None, mpiexec: str | None = None,
                  flavor: str | None = None, python: str | None = None,
                  workdir: str | Path | None = None) -> list[str]:
    """The mpiexec command line that runs ``python -m mpi4py ARGV`` on ``n`` ranks.

    argv: what follows ``python -m mpi4py`` (``["-m", "distnet.dist.entry", "job.json"]``).
    hostfile: a ``host slots=N`` file for multi-node runs; for MPICH it is rewritten
    as ``host:N`` into ``workdir`` (default: a new temporary folder). env: variables
    every rank gets (default: ``rank_environment``).
    """
    if n < 1:
        raise ValueError(f"need at least one rank, got {n}")
    mpiexec = mpiexec or find_mpiexec()
    flavor = flavor or mpi_flavor(mpiexec)
    if flavor not in ("mpich", "openmpi"):
        raise ValueError(f"unknown MPI flavor {flavor!r}")
    cmd = [mpiexec, "-n", str(n)]
    slots, n_local = None, n
    if hostfile is not None:
        hosts = read_hostfile(hostfile)
        slots = sum(h.slots for h in hosts)
        n_local = -(-n // len(hosts))
        if flavor == "mpich":
            folder = Path(workdir or tempfile.mkdtemp(prefix="distnet-hosts-"))
            converted = folder / "hosts.hydra"
            converted.write_text(format_hostfile(hosts, "mpich"), encoding="utf-8")
            cmd += ["-f", str(converted)]
        else:
            cmd += ["--hostfile", str(hostfile)]
    if flavor == "openmpi":
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-run-as-root")  # Open MPI refuses root without it
        if slots is None or n > slots:
            cmd.append("--oversubscribe")  # more ranks than cores is normal in tests
    env = rank_environment(n_local) if env is None else env
    for key, value in sorted(env.items()):
        # -genv/-x with a value: the value is set on every host, not read from each
        cmd += ["-genv", key, value] if flavor == "mpich" else ["-x", f"{key}={value}"]
    cmd += [python or sys.executable, "-m", "mpi4py", *argv]
    return cmd


class JobFailed(RuntimeError):
    """An MPI job ended with a non-zero exit status."""

    def __init__(self, message: str, returncode: int, stderr_tail: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


def launch(cmd: list[str], *, timeout: float | None = None, env: dict[str, str] | None = None,
           echo_stderr: bool = True, tail_bytes: int = 16384, what: str = "MPI job") -> str:
    """Run ``cmd`` in its own process group; return the tail of its stderr.

    stderr is relayed as it arrives (progress bars stay live) and its last
    ``tail_bytes`` are kept for the error message. The whole group is killed on
    timeout, on an exception here (Ctrl-C) and on exit, so no rank outlives the job.
    Raises TimeoutError or JobFailed.
    """
    tail = bytearray()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env, start_new_session=True,
                            preexec_fn=_die_with_parent)
    restore = _terminate_as_exception()

    def relay() -> None:
        assert proc.stderr is not None
        while chunk := os.read(proc.stderr.fileno(), 65536):
            if echo_stderr:
                sys.stderr.buffer.write(chunk)
                sys.stderr.buffer.flush()
            tail.extend(chunk)
            del tail[:-tail_bytes]

    reader = threading.Thread(target=relay, name="stderr-relay", daemon=True)
    reader.start()
    try:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for the {what} "
                               f"({' '.join(cmd[:3])} ...) to finish") from None
    finally:
        kill_group(proc)
        reader.join(timeout=5)
        restore()
    text = tail.decode("utf-8", "replace")
    if code != 0:
        raise JobFailed(failure_message(what, code, text), code, text)
    return text


def _die_with_parent() -> None:
    """In the child: have Linux send SIGTERM when the launching process dies, even by
    SIGKILL, so an mpiexec (which then stops its ranks) never outlives us."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the process-group cleanup in launch() still applies


def _terminate_as_exception():
    """Turn SIGTERM into SystemExit while we wait, so the ``finally`` that ends the
    job's process group runs; returns a function restoring the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def kill_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL what is left after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
            if sig == signal.SIGTERM:
                # the leader is gone; reap stragglers of the group all the same
                os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except (ProcessLookupError, PermissionError):
            return


def failure_message(what: str, code: int, stderr_tail: str) -> str:
    """One readable message: which rank failed and why, from the ranks' stderr."""
    lines = [ln.strip() for ln in stderr_tail.replace("\r", "\n").splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith(("distnet: rank ", "distnet: error: "))]
    detail = ours[0] if ours else next(
        (ln for ln in reversed(lines) if "Error" in ln or "Exception" in ln), "")
    message = f"{what} failed with exit code {code}"
    return f"{message}: {detail}" if detail else f"{message} (no error message on stderr)"


def _train_ranks(train_args: list[str]) -> int:
    """Ranks a ``distnet train`` command line needs (its ``--config`` file included):
    workers, plus the server processes unless they run elsewhere or in worker ranks."""
    from distnet.cli.main import parse_command
    from distnet.cli.train import resolve
    from distnet.dist.job import ranks_needed

    return ranks_needed(resolve(parse_command(["train", *train_args])))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m distnet.dist.launcher",
        description="Run 'distnet train ARGS' on MPI ranks (servers first, then workers).")
    p.add_argument("-n", "--np", dest="n", type=int, default=None,
                   help="ranks in all (default: --workers plus --servers of the train args)")
    p.add_argument("--hostfile", default=None, help="hostfile, 'host slots=N' lines")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("--timeout", type=float, default=None, help="seconds the job may take")
    args, train_args = p.parse_known_args(argv)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    n = args.n or _train_ranks(train_args)
    argv = ["-m", "distnet.cli.main", "train", *train_args]
    if args.dry_run:  # the converted hostfile stays, so the printed command runs as is
        print(" ".join(build_command(argv, n, hostfile=args.hostfile)))
        return 0
    with tempfile.TemporaryDirectory(prefix="distnet-launch-") as workdir:
        cmd = build_command(argv, n, hostfile=args.hostfile, workdir=workdir)
        try:
            launch(cmd, timeout=args.timeout, what="distnet train job")
        except (JobFailed, TimeoutError) as exc:
            print(f"distnet: error: {exc}", file=sys.stderr)
            return getattr(exc, "returncode", 1) or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
