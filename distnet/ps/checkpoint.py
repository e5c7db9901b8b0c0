"""Server checkpoints: everything a shard needs to carry on after a crash, in one ``.npz``.

Layout (read with ``allow_pickle=False``; written by ``distnet.checkpoint``'s atomic
writer: temporary file, fsync, ``os.replace``, SHA-256 trailer in the zip comment):

- ``param/<key>``: the shard's parameters;
- ``optim/<key>``: the optimizer's ``state_dict()`` (absent for optimizers without one);
- ``round/<key>``: sync mode, the sum of the gradients of the round in progress;
- ``meta``: UTF-8 JSON as uint8: format, server id, mode, worker count, version,
  layout, registered workers, each worker's last accepted ``seq`` and session, SSP
  clocks, lost workers, the open round's ``{wid: seq}``, counters and the job config.

Files are ``ps-<server>-v<version>.npz`` in one directory; the newest ``keep`` stay.
A resumed server restores all of it, so a resent gradient that the checkpoint
already holds is recognised as a duplicate, and one that came after it is applied.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# the model checkpoints' atomic writer and digest check: one implementation of both
from distnet.checkpoint import (
    CheckpointError,
    _json_default,
    _verify_digest,
    _write_atomic,
    read_verified_npz,
)

log = logging.getLogger("distnet.ps.checkpoint")
FORMAT = "distnet-ps-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ps-(?P<server>\d+)-v(?P<version>\d+)\.npz$")
_COUNTERS = ("pushes_applied", "gradients_received", "duplicates", "rejected", "timeouts",
             "replies_dropped", "workers_lost", "rejoins", "recovered")


@dataclass
class ServerCheckpoint:
    """A loaded checkpoint: arrays by group and the meta document."""

    params: dict[str, np.ndarray]
    optim: dict[str, np.ndarray]
    round_sum: dict[str, np.ndarray]
    meta: dict[str, Any]
    path: Path


def checkpoint_path(directory: str | Path, server_id: int, version: int) -> Path:
    return Path(directory) / f"ps-{server_id}-v{version:012d}.npz"


def list_checkpoints(directory: str | Path, server_id: int) -> list[tuple[int, Path]]:
    """``(version, path)`` of this shard's checkpoints in ``directory``, oldest first."""
    found = []
    root = Path(directory)
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and int(m["server"]) == server_id:
                found.append((int(m["version"]), p))
    return sorted(found)


def latest_checkpoint(directory: str | Path, server_id: int) -> Path | None:
    """The newest readable checkpoint of this shard (a damaged newest one is skipped)."""
    for _, path in reversed(list_checkpoints(directory, server_id)):
        try:
            _verify_digest(path)
        except (CheckpointError, OSError):
            continue  # the crash may have hit something other than our atomic rename
        return path
    return None


def save(path: Path, server: Any) -> Path:
    """Write ``server``'s state to ``path`` atomically."""
    st, c = server.state, server.consistency
    arrays = {f"param/{k}": a for k, a in st.arrays.items()}
    opt = st.optimizer
    has_optim = opt is not None and hasattr(opt, "state_dict")
    if has_optim:
        arrays.update({f"optim/{k}": np.asarray(v) for k, v in opt.state_dict().items()})
    round_sum = st.round_sum()
    if round_sum is not None:
        arrays.update({f"round/{k}": a for k, a in round_sum.items()})
    meta = {
        "format": FORMAT, "version": VERSION, "written_at": time.time(),
        "server_id": server.server_id, "mode": server.mode, "num_workers": c.num_workers,
        "staleness": c.bound or 0, "param_version": st.version, **st.layout(),
        "has_optimizer_state": has_optim,
        "registered": sorted(c.registered), "clocks": _str_keys(c.clocks),
        "last_seq": _str_keys(c.last_seq), "session": _str_keys(c.session),
        "lost": _str_keys(c.lost), "round": _str_keys(c.round), "accumulated": st.accumulated,
        "counters": {k: server.counters[k] for k in _COUNTERS},
        "staleness_hist": _str_keys(server.staleness_hist),
        "job_config": server.job_config,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta, default=_json_default).encode(), np.uint8)
    _write_atomic(path, arrays)
    return path


def load(path: str | Path) -> ServerCheckpoint:
    """Read and check a server checkpoint (CheckpointError names what is wrong)."""
    path = Path(path)
    arrays = read_verified_npz(path, "server checkpoint")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode("utf-8"))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupted server checkpoint ({type(exc).__name__}: "
                              f"{exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a parameter-server checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: server checkpoint version {meta.get('version')!r} is "
                              f"not supported (this distnet reads {VERSION})")
    groups: dict[str, dict[str, np.ndarray]] = {"param": {}, "optim": {}, "round": {}}
    for name, arr in arrays.items():
        group, _, key = name.partition("/")
        if group not in groups:
            raise CheckpointError(f"{path}: unexpected array {name!r}")
        groups[group][key] = arr
    return ServerCheckpoint(groups["param"], groups["optim"], groups["round"], meta, path)


def restore(server: Any, ckpt: ServerCheckpoint, now: float) -> None:
    """Load ``ckpt`` into a freshly built ``server`` after checking that it fits."""
    st, c, meta = server.state, server.consistency, ckpt.meta
    expect = {"server_id": server.server_id, "mode": server.mode, "num_workers": c.num_workers,
              **st.layout()}
    for field, value in expect.items():
        if meta.get(field) != value:
            raise CheckpointError(f"{ckpt.path}: {field} is {meta.get(field)!r:.120}, this "
                                  f"server has {value!r:.120}: not this shard's checkpoint")
    for key, arr in st.arrays.items():
        np.copyto(arr, ckpt.params[key])  # in place: replies send these very arrays
    if meta.get("has_optimizer_state") and hasattr(st.optimizer, "load_state_dict"):
        try:
            st.optimizer.load_state_dict(ckpt.optim)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{ckpt.path}: optimizer state does not fit: {exc}") from None
    st.version = int(meta["param_version"])
    c.registered = set(meta["registered"])
    c.clocks.update(_int_keys(meta["clocks"]))
    c.last_seq = _int_keys(meta["last_seq"])
    c.session = _int_keys(meta["session"])
    c.lost = _int_keys(meta["lost"])
    c.live = set(range(c.num_workers)) - set(c.lost)
    c.round = _int_keys(meta["round"])
    if ckpt.round_sum:
        st.restore_round(ckpt.round_sum, meta["accumulated"])
    # everyone gets a full worker_timeout to reconnect before counting as lost
    c.last_seen = dict.fromkeys(c.registered, now)
    server.counters.update(meta.get("counters", {}))
    server.staleness_hist.update(_int_keys(meta.get("staleness_hist", {})))
    if server.job_config is None:
        server.job_config = meta.get("job_config")


def prune(directory: str | Path, server_id: int, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of this shard."""
    for _, path in list_checkpoints(directory, server_id)[:-keep] if keep > 0 else []:
        with contextlib.suppress(OSError):
            path.unlink()


def _str_keys(d: dict) -> dict[str, Any]:
    return {str(k): v for k, v in d.items()}


def _int_keys(d: dict) -> dict[int, Any]:
    return {int(k): v for k, v in d.items()}


class Checkpointer:
    """When and where one server writes checkpoints, and where it resumed from.

    every: versions between checkpoints (0: none but the stop checkpoint). keep: how
    many of this shard's newest stay. on_stop: write one when the loop ends (default:
    when there is a directory). ``horizon``: after a resume, the highest version a
    gradient may claim (versions the server reached before the crash, < one interval on).
    """

    def __init__(self, directory: str | Path | None, every: int = 0, keep: int = 2,
                 on_stop: bool | None = None, resume: str | Path | bool | None = None) -> None:
        if every < 0 or keep < 1:
            raise ValueError(f"checkpoint_every must be >= 0 and checkpoint_keep >= 1, got "
                             f"{every} and {keep}")
        if directory is None and resume not in (None, True, False) and Path(resume).is_dir():
            directory = resume  # carry on writing where we resumed from
        if (every or on_stop) and directory is None:
            raise ValueError("checkpoint_every / checkpoint_on_stop need checkpoint_dir")
        self.directory = Path(directory) if directory is not None else None
        self.every, self.keep = int(every), int(keep)
        self.on_stop = bool(directory is not None if on_stop is None else on_stop)
        self.resume_from = resume
        self.last: dict[str, Any] | None = None
        self.resumed_from: dict[str, Any] | None = None
        self.horizon = -1

    def resume(self, server: Any) -> None:
        """Restore ``server`` from the checkpoint ``resume`` names, if any."""
        path = self._resume_path(server.server_id)
        if path is None:
            return
        restore(server, load(path), time.monotonic())
        v = server.state.version
        self.resumed_from = {"path": str(path), "version": v}
        self.horizon = v + self.every if self.every else 2**62
        log.warning("server %d resumed from %s at version %d", server.server_id, path, v)

    def _resume_path(self, server_id: int) -> Path | None:
        resume = self.resume_from
        if resume is None or resume is False:
            return None
        if resume is True:
            if self.directory is None:
                raise ValueError("resume=True needs checkpoint_dir")
            return latest_checkpoint(self.directory, server_id)
        path = Path(resume)
        if path.is_dir():
            found = latest_checkpoint(path, server_id)
            if found is None:
                raise FileNotFoundError(f"no readable checkpoint of shard {server_id} "
                                        f"(ps-{server_id}-v*.npz) in {path}")
            return found
        return path

    def save(self, server: Any) -> Path | None:
        """Write a checkpoint of ``server`` now; None on failure (logged and counted: a
        full disk must not stop training)."""
        if self.directory is None:
            raise ValueError("saving a checkpoint needs checkpoint_dir")
        t0 = time.perf_counter()
        path = checkpoint_path(self.directory, server.server_id, server.state.version)
        try:
            save(path, server)
            prune(self.directory, server.server_id, self.keep)
        except (OSError, ValueError, TypeError) as exc:
            server.counters["checkpoint_errors"] += 1
            log.error("server %d: checkpoint %s failed: %s", server.server_id, path, exc)
            return None
        server.counters["checkpoints_written"] += 1
        self.last = {"path": str(path), "version": server.state.version,
                     "seconds": round(time.perf_counter() - t0, 4)}
        return path

    def after_update(self, server: Any) -> None:
        if self.every and server.state.version % self.every == 0:
            self.save(server)
