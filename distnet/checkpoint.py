"""Checkpoints: a model, its optimizer state and a JSON description in one ``.npz``.

Layout (NumPy's ``.npz``, a zip of ``.npy`` arrays, read with ``allow_pickle=False``):

- ``model/<name>``: ``model.state_dict()`` (parameters, buffers, ``<name>_mask`` masks);
- ``optim/<key>``: ``optimizer.state_dict()`` (``<param>/<slot>`` and ``step``);
- ``meta``: UTF-8 JSON as a uint8 array: ``{"format": "distnet-checkpoint", "version": 1,
  "spec": model.to_spec(), "optimizer": {"name", "config"} | null, ...user meta}``.

The file is written to a temporary file in the same directory, fsynced and
renamed over the target, so a crash never leaves a half-written checkpoint. The
zip comment holds a SHA-256 of everything before it: zip CRCs cover only the array
bytes, the digest catches any damaged byte (headers included) and truncation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distnet.nn.module import Module, from_spec

FORMAT = "distnet-checkpoint"
VERSION = 1
_DIGEST_TAG = b"distnet-sha256:"
_DIGEST_LEN = len(_DIGEST_TAG) + 64  # tag + hex SHA-256
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record, 22 bytes + comment
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged or does not describe a valid model."""


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns: the rebuilt model (on the CPU, in train mode),
    the optimizer state (``<param>/<slot>`` -> array, plus ``step``) and the meta document."""

    model: Module
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def optimizer_info(self) -> dict[str, Any] | None:
        """``{"name", "config"}`` of the optimizer saved with the model, or None."""
        return self.meta.get("optimizer")


def save_checkpoint(path: str | Path, model: Module, optimizer: Any = None,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``optimizer``'s state, and ``meta``) to ``path`` atomically.

    meta: JSON-able user information (model name and config, data info, training
    mode, epoch, metrics) merged into the meta document; it may not use the keys
    ``format``, ``version``, ``spec`` or ``optimizer``. Returns the path written.
    """
    path = Path(path)
    arrays: dict[str, np.ndarray] = {f"model/{k}": v for k, v in model.state_dict().items()}
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "spec": model.to_spec(),
                           "optimizer": None}
    if optimizer is not None:
        arrays.update({f"optim/{k}": np.asarray(v) for k, v in optimizer.state_dict().items()})
        doc["optimizer"] = {"name": optimizer.name, "config": optimizer.get_config()}
    clash = sorted(set(meta or {}) & set(doc))
    if clash:
        raise ValueError(f"checkpoint meta may not set the reserved keys {clash}")
    doc.update(meta or {})
    for key, arr in arrays.items():
        if arr.dtype.hasobject:  # would need pickle to write and to read back
            raise TypeError(f"checkpoint array {key!r} has dtype object; only numeric arrays "
                            "can be saved")
    try:
        text = json.dumps(doc, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta is not JSON-able: {exc}") from None
    arrays["meta"] = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    _write_atomic(path, arrays)
    return path


def read_verified_npz(path: str | Path, what: str = "checkpoint") -> dict[str, np.ndarray]:
    """Every array of an npz that distnet wrote, after its SHA-256 trailer and each
    member's CRC are checked (FileNotFoundError, or CheckpointError naming the problem)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    _verify_digest(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}  # reading every member checks its CRC
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: corrupted {what} ({type(exc).__name__}: {exc})"
                              ) from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint`` and rebuild its model.

    Raises FileNotFoundError for a missing file and CheckpointError (a ValueError)
    for anything else wrong: not an npz, truncated or corrupted bytes, a missing or
    foreign meta document, an unsupported version, arrays that do not fit the spec.
    """
    import distnet.nn  # noqa: F401 - registers the layer classes that from_spec looks up

    path = Path(path)
    arrays = read_verified_npz(path)
    meta = _parse_meta(path, arrays.pop("meta", None))
    model_state = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
    optim_state = {k[6:]: v for k, v in arrays.items() if k.startswith("optim/")}
    stray = sorted(k for k in arrays if not k.startswith(("model/", "optim/")))
    if stray:
        raise CheckpointError(f"{path}: unexpected arrays {stray}")
    if optim_state and not meta.get("optimizer"):
        raise CheckpointError(f"{path}: optimizer arrays present but no optimizer in meta")
    try:
        model = from_spec(meta["spec"])
        model.load_state_dict(model_state)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the arrays do not match the model spec: {exc}") from None
    return Checkpoint(model=model, optimizer_state=optim_state, meta=meta, path=path)


def build_optimizer_from_checkpoint(ckpt: Checkpoint, model: Module | None = None) -> Any:
    """The checkpoint's optimizer over ``model`` (default ``ckpt.model``), state restored."""
    from distnet.optim import build_optimizer

    info = ckpt.optimizer_info
    if not info:
        raise CheckpointError(f"{ckpt.path}: the checkpoint holds no optimizer")
    optimizer = build_optimizer(info["name"], model if model is not None else ckpt.model,
                                **info.get("config", {}))
    try:
        optimizer.load_state_dict(ckpt.optimizer_state)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.path}: optimizer state does not fit the model: {exc}"
                              ) from None
    return optimizer


# ---- helpers ---------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} {value!r:.60} is not JSON-able")


def _write_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w+b") as f:
            np.savez(f, **arrays)
            _append_digest(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (not possible everywhere)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _append_digest(f: Any) -> None:
    """Set the zip comment to the SHA-256 of every byte before it (the EOCD included)."""
    f.seek(-22, os.SEEK_END)
    eocd = f.read(22)
    if eocd[:4] != _EOCD or eocd[20:22] != b"\x00\x00":
        raise RuntimeError("np.savez did not end the archive with a plain EOCD record")
    f.seek(-2, os.SEEK_END)
    f.write(struct.pack("<H", _DIGEST_LEN))
    f.seek(0)
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        digest.update(chunk)
    f.seek(0, os.SEEK_END)
    f.write(_DIGEST_TAG + digest.hexdigest().encode("ascii"))


def _verify_digest(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(4)
        if head != b"PK\x03\x04":
            raise CheckpointError(f"{path}: not a distnet checkpoint (not a zip/.npz file)")
        if size < _DIGEST_LEN + 22:
            raise CheckpointError(f"{path}: truncated checkpoint ({size} bytes)")
        f.seek(size - _DIGEST_LEN - 22)
        tail = f.read()
        eocd, comment = tail[:22], tail[22:]
        if eocd[:4] != _EOCD or not comment.startswith(_DIGEST_TAG) \
                or struct.unpack("<H", eocd[20:22])[0] != _DIGEST_LEN:
            raise CheckpointError(f"{path}: truncated or damaged checkpoint (its end record "
                                  "and checksum are missing; was it written by distnet?)")
        f.seek(0)
        digest, left = hashlib.sha256(), size - _DIGEST_LEN
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    if digest.hexdigest().encode("ascii") != comment[len(_DIGEST_TAG):]:
        raise CheckpointError(f"{path}: corrupted checkpoint (SHA-256 checksum mismatch)")


def _parse_meta(path: Path, raw: np.ndarray | None) -> dict[str, Any]:
    if raw is None:
        raise CheckpointError(f"{path}: no 'meta' document: not a distnet checkpoint")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: 'meta' must be a 1-D uint8 array, got {raw.dtype} "
                              f"{raw.shape}")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: 'meta' is not UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: not a distnet checkpoint (format {got!r}, expected "
                              f"{FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r} is not "
                              f"supported (this distnet reads version {VERSION})")
    if not isinstance(meta.get("spec"), dict):
        raise CheckpointError(f"{path}: meta has no model 'spec'")
    return meta
