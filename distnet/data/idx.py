"""The IDX file format of MNIST (gzip-compressed or raw), read and written without pickle.

Layout: a 4-byte magic ``00 00 TT DD`` (TT: element type, DD: number of
dimensions), DD big-endian uint32 sizes, then the elements in C order, big-endian.
MNIST images have magic 0x00000803 (uint8, 3 dims), labels 0x00000801 (uint8, 1 dim).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

# IDX type byte -> big-endian NumPy dtype
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXError(ValueError):
    """An IDX file is malformed, truncated or not the kind expected."""


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise IDXError(f"{path}: corrupt or truncated gzip data ({exc})") from None


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file into an array of its native dtype (uint8 for MNIST), C order.

    Raises IDXError naming the file for a wrong magic (expected vs got), an unknown
    element type, a truncated header or body, or trailing bytes.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    (magic,) = struct.unpack(">I", data[:4])
    if expected_magic is not None and magic != expected_magic:
        raise IDXError(f"{path}: wrong IDX magic: expected 0x{expected_magic:08x}, "
                       f"got 0x{magic:08x}")
    type_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if magic >> 16 != 0 or type_code not in IDX_TYPES or ndim == 0:
        raise IDXError(f"{path}: not an IDX file (magic 0x{magic:08x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[type_code])
    need = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = len(data) - header
    if have < need:
        raise IDXError(f"{path}: truncated IDX data: shape {shape} needs {need} bytes, "
                       f"found {have}")
    if have > need:
        raise IDXError(f"{path}: {have - need} unexpected bytes after the IDX data of shape "
                       f"{shape}")
    arr = np.frombuffer(data, dtype=dtype, count=need // dtype.itemsize, offset=header)
    return arr.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed when the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None or not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX cannot hold dtype {array.dtype} with {array.ndim} dimensions")
    header = struct.pack(">I", (code << 8) | array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    body = header + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()
    path.write_bytes(gzip.compress(body) if path.suffix == ".gz" else body)
    return path


def read_mnist_pair(images: str | Path, labels: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-style images and labels: ``x (N, 1, H, W)`` float32 in [0, 1], ``y (N,)`` int64.

    Raises IDXError when the magics are not those of images/labels or the counts differ.
    """
    img = read_idx(images, IMAGES_MAGIC)
    lab = read_idx(labels, LABELS_MAGIC)
    if len(img) != len(lab):
        raise IDXError(f"{images} holds {len(img)} images but {labels} holds {len(lab)} labels")
    x = img.astype(np.float32)[:, None]
    x /= 255.0
    return x, lab.astype(np.int64)
