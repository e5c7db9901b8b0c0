"""The same-host data plane: parameters and gradients in shared memory, headers on ZeroMQ.

Between processes of one host, moving a 1 MB gradient through TCP loopback costs
each side a kernel copy, an I/O-thread hand-off and a wake-up (about 1 ms each way
for lenet300 on a 2-core machine), where MPI moves it through shared memory. A
sync-mode server therefore keeps its parameters in a file under ``/dev/shm``
(``Segment``), followed by one gradient slot per worker id. Its ``register`` reply
names the file and a random nonce; a worker that can open the file and reads that
nonce in it is on the same host (another host has no such file, or not that nonce).
Such a worker copies its gradient into its slot and sends only the msgpack header
(``"shm": true``); the server's reply is a header too, and the worker copies the
parameters out of the segment. BytePS does the same between co-located workers and
servers.

Why this is safe in sync mode: the server writes the parameters only when a round
completes, i.e. after every live worker has pushed, and a worker pushes only after it
has copied the parameters of the previous round; a worker writes its slot only while
none of its requests that use the slot is outstanding, and the server is done with a
slot's gradient before it answers (it reads the slot in the round's optimizer step, or
copies it out first when it must answer early: ``ServerState.answering``). A seqlock
(an even counter, odd while the optimizer writes) catches the one exception, a worker
that the server stopped waiting for: its copy is refused with an error instead of used
torn.

Layout: a 4096-byte header page (magic, nonce, seqlock counter), then the parameter
region, then ``num_slots`` gradient regions of the same layout; each tensor starts
on a 64-byte boundary. The file is created ``0600`` (other users cannot read the
parameters) and fully allocated with ``posix_fallocate``, so a full ``/dev/shm``
is an error at creation (and the server falls back to frames) rather than a SIGBUS
at the first write. The server unlinks it on close; files of servers that died
without closing are removed by the next server that starts on the host.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import re
import secrets
from typing import Any

import numpy as np

from distnet.ps.protocol import Entry

log = logging.getLogger("distnet.ps.shm")

DIRECTORY = "/dev/shm"
_MAGIC = b"DNSHM001"
_PAGE = 4096
_ALIGN = 64
_SEQ_OFFSET = 24  # magic (8) | nonce (16) | seqlock counter (uint64)
_NAME = re.compile(r"^distnet-(?P<pid>\d+)-[0-9a-f]{12}$")
# at most this share of the free space in /dev/shm (docker gives it 64 MB by default)
_MAX_SHARE = 0.5


def region_layout(shapes: list[tuple[int, ...]], dtypes: list[np.dtype]) -> tuple[list[int], int]:
    """Byte offsets of each tensor in a region, and the region's size (a multiple of
    the page size, so every region starts page-aligned)."""
    offsets, pos = [], 0
    for shape, dtype in zip(shapes, dtypes, strict=True):
        offsets.append(pos)
        pos += -(-math.prod(shape) * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
    return offsets, -(-pos // _PAGE) * _PAGE


class Segment:
    """A mapped segment: the parameter region (``params``) and the worker slots (``slot``).

    keys/shapes/dtypes: the server's tensors in its order. Use ``create`` (the server,
    which owns and unlinks the file) or ``attach`` (a worker).
    """

    def __init__(self, path: str, mm: mmap.mmap, keys: list[str],
                 shapes: list[tuple[int, ...]], dtypes: list[np.dtype], num_slots: int,
                 nonce: bytes, owner: bool) -> None:
        self.path, self.name, self.keys = path, os.path.basename(path), list(keys)
        self.shapes, self.dtypes = [tuple(s) for s in shapes], [np.dtype(d) for d in dtypes]
        self.num_slots, self.nonce, self.owner = num_slots, nonce, owner
        self._mm: mmap.mmap | None = mm
        self.offsets, self.region = region_layout(self.shapes, self.dtypes)
        self._seq = np.ndarray((1,), np.uint64, buffer=mm, offset=_SEQ_OFFSET)
        # what a message whose arrays are in this segment stands for (protocol.decode)
        self.layout = {"keys": self.keys, "dtypes": [d.name for d in self.dtypes],
                       "shapes": [list(s) for s in self.shapes], "meta": [{} for _ in keys]}
        self._regions = [self._arrays(_PAGE + r * self.region) for r in range(1 + num_slots)]
        # the decoded form of each region, made once: a message in shared memory stands
        # for exactly these (views of the segment; nobody writes an Entry)
        self._entries = [[Entry(k, a.dtype, a.shape, [a.reshape(-1)]) for k, a in r.items()]
                         for r in self._regions]
        self.nbytes = sum(a.nbytes for a in self._regions[0].values())  # of the parameters

    # ---- creating and attaching ------------------------------------------------------------
    @classmethod
    def create(cls, arrays: dict[str, np.ndarray], num_slots: int,
               directory: str = DIRECTORY) -> Segment | None:
        """A new segment holding a copy of ``arrays`` (None where shared memory cannot be
        had: no ``directory``, not enough room; the reason is logged)."""
        if not os.path.isdir(directory):
            return None
        remove_stale(directory)
        keys = list(arrays)
        shapes = [tuple(a.shape) for a in arrays.values()]
        dtypes = [a.dtype for a in arrays.values()]
        size = _PAGE + (1 + num_slots) * region_layout(shapes, dtypes)[1]
        stat = os.statvfs(directory)
        if size > _MAX_SHARE * stat.f_bavail * stat.f_frsize:
            log.info("no shared-memory segment: %d bytes is more than half of what %s has free",
                     size, directory)
            return None
        path = os.path.join(directory, f"distnet-{os.getpid()}-{secrets.token_hex(6)}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            log.info("no shared-memory segment: cannot create %s: %s", path, exc)
            return None
        try:
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            log.info("no shared-memory segment of %d bytes in %s: %s", size, directory, exc)
            return None
        os.close(fd)
        nonce = secrets.token_bytes(16)
        mm[:_SEQ_OFFSET] = _MAGIC + nonce
        seg = cls(path, mm, keys, shapes, dtypes, num_slots, nonce, owner=True)
        for dst, src in zip(seg.params().values(), arrays.values(), strict=True):
            np.copyto(dst, src)
        return seg

    @classmethod
    def attach(cls, info: Any, keys: list[str], shapes: list[tuple[int, ...]],
               dtypes: list[np.dtype], directory: str = DIRECTORY) -> Segment | None:
        """The segment a ``register`` reply describes (``info()``), or None when it cannot
        be this host's: no such file, another size, another nonce, or a malformed
        description (it came over the network: the name must be one ``create`` makes)."""
        if not isinstance(info, dict):
            return None
        name, nonce, slots, size = (info.get(k) for k in ("name", "nonce", "slots", "size"))
        if not (isinstance(name, str) and _NAME.match(name) and isinstance(nonce, bytes)
                and len(nonce) == 16 and isinstance(slots, int) and 0 < slots < 1 << 20
                and isinstance(size, int)):
            return None
        if size != _PAGE + (1 + slots) * region_layout(shapes, dtypes)[1]:
            return None
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None  # another host (or the server is gone)
        try:
            if os.fstat(fd).st_size != size:
                return None
            mm = mmap.mmap(fd, size)
        except OSError:
            return None
        finally:
            os.close(fd)
        if mm[:_SEQ_OFFSET] != _MAGIC + nonce:
            mm.close()
            return None
        return cls(path, mm, keys, shapes, dtypes, slots, nonce, owner=False)

    def info(self) -> dict[str, Any]:
        """What a worker needs to attach (sent in the ``register`` reply)."""
        return {"name": self.name, "nonce": self.nonce, "slots": self.num_slots,
                "size": _PAGE + (1 + self.num_slots) * self.region}

    # ---- the regions ----------------------------------------------------------------------
    def _arrays(self, base: int) -> dict[str, np.ndarray]:
        assert self._mm is not None
        return {k: np.ndarray(s, d, buffer=self._mm, offset=base + o)
                for k, s, d, o in zip(self.keys, self.shapes, self.dtypes, self.offsets,
                                      strict=True)}

    def params(self) -> dict[str, np.ndarray]:
        """key -> the parameter arrays (views of the segment)."""
        return self._regions[0]

    def slot(self, wid: int) -> dict[str, np.ndarray]:
        """key -> worker ``wid``'s gradient arrays (views of the segment)."""
        return self._regions[1 + self._slot_index(wid)]

    def entries(self, wid: int | None = None) -> list[Entry]:
        """The parameters (``wid`` None) or worker ``wid``'s gradient as decoded entries."""
        return self._entries[0 if wid is None else 1 + self._slot_index(wid)]

    def _slot_index(self, wid: int) -> int:
        if not 0 <= wid < self.num_slots:
            raise IndexError(f"worker {wid} has no slot: the segment has {self.num_slots}")
        return wid

    # ---- the seqlock ----------------------------------------------------------------------
    @property
    def seq(self) -> int:
        return int(self._seq[0])

    @contextlib.contextmanager
    def writing(self) -> Any:
        """Bracket an in-place change of the parameters (readers see an odd counter)."""
        self._seq[0] += 1
        try:
            yield
        finally:
            self._seq[0] += 1

    # ---- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        """Let go of the mapping; the owner also removes the file. The mapping itself is
        never closed here: arrays viewing it (a model's parameters, a ticket's slot) hold
        the mmap object as their base and keep it mapped until the last one goes, whereas
        ``mmap.close()`` would unmap under them (NumPy holds no buffer export for it)."""
        if self._mm is None:
            return
        self._regions, self._seq, self._mm = [], None, None  # type: ignore[assignment]
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def remove_stale(directory: str = DIRECTORY) -> int:
    """Remove segments whose creating process is gone (a server that was killed);
    returns how many."""
    removed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    for name in names:
        m = _NAME.match(name)
        if m is None or _alive(int(m["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(directory, name))
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to clean
        return True
    return True
