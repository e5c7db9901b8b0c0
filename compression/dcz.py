"""The .dcz compressed-model file: everything needed to rebuild a distnet model, no pickle.

Layout (little endian)::

    magic  b"\\x89DCZ"     4 bytes
    version, flags        2 x uint8
    header_len            uint32   zlib-compressed msgpack header
    payload_len           uint32   concatenated bitstreams
    header_crc32          uint32
    payload_crc32         uint32
    header | payload

The header holds the model spec (``Module.to_spec()``, so pruned, low-rank or
folded architectures rebuild), free-form ``meta`` and one record per state entry
(parameters and buffers, in ``state_dict`` order). A record says where the kept
entries are (``dense``: all; ``sparse``: relative indices, Huffman-coded, with a
filler symbol when a gap exceeds the ``gap_bits`` width, as in Deep Compression)
and what their values are (``raw`` float32 / float16 / the buffer's dtype, or
``book``: a codebook, of shared values or of a per-channel affine quantizer,
plus a Huffman- or fixed-width-coded index stream). Every choice (codebook or
raw, float16 when exact, gap width, Huffman or fixed width) is made per tensor by
measured size, and is lossless: a loaded model's weights equal the saved ones.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from compression import huffman
from compression.linear_quant import QuantizedTensor, affine_codebook
from distnet import backend
from distnet.nn.module import Module, from_spec

MAGIC = b"\x89DCZ"
VERSION = 1
_FIXED = struct.Struct("<4sBBIIII")
MAX_BOOK = 4096  # more distinct values than this: store them raw
MAX_GAP_BITS = 12


class DczError(ValueError):
    """A .dcz file that cannot be read: not one, truncated, corrupted or mismatched."""


@dataclass
class LoadedDcz:
    """``load_dcz`` result: the rebuilt model (eval mode), its meta and the file's stats."""

    model: Module
    meta: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)


# ---- streams ------------------------------------------------------------------------

class _Payload:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> dict[str, int]:
        ref = {"off": self.size, "len": len(data)}
        self.chunks.append(data)
        self.size += len(data)
        return ref


def _code_stream(symbols: np.ndarray, alphabet: int) -> tuple[dict[str, Any], bytes, int]:
    """The smaller of Huffman and fixed width -> (descriptor, bytes, cost in bytes)."""
    width = int(max(alphabet - 1, 0)).bit_length()
    fixed = huffman.pack_uint(symbols, width)
    best = ({"coding": "fixed", "width": width, "count": int(symbols.size)}, fixed, len(fixed))
    if symbols.size and alphabet > 1:
        enc = huffman.encode(symbols, alphabet)
        used = int(np.flatnonzero(enc.lengths).max()) + 1
        table = enc.lengths[:used].tobytes()  # trailing unused symbols need no entry
        cost = enc.nbytes + len(zlib.compress(table, 9))  # the header is zlib-compressed
        if cost < best[2]:
            best = ({"coding": "huffman", "lengths": table, "nbits": enc.nbits,
                     "count": enc.count}, enc.data, cost)
    return best


def _read_stream(desc: dict[str, Any], data: bytes, alphabet: int) -> np.ndarray:
    if desc["coding"] == "fixed":
        return huffman.unpack_uint(data, int(desc["count"]), int(desc["width"]))
    if desc["coding"] == "huffman":
        lengths = np.frombuffer(desc["lengths"], dtype=np.uint8)
        if lengths.size > alphabet:
            raise DczError(f"Huffman table of {lengths.size} symbols for an alphabet of "
                           f"{alphabet}")
        return huffman.decode(data, int(desc["count"]), lengths, int(desc["nbits"]))
    raise DczError(f"unknown stream coding {desc['coding']!r}")


def gap_symbols(positions: np.ndarray, gap_bits: int) -> np.ndarray:
    """Relative indices of sorted flat ``positions`` with filler symbols.

    Symbol s < M = 2**gap_bits - 1 means "advance s + 1, a kept entry is here";
    s = M means "advance M, nothing here" (the paper's filler zero, without spending
    a weight index on it).
    """
    m = 2**gap_bits - 1
    gaps = np.diff(np.asarray(positions, np.int64), prepend=-1)
    fillers = (gaps - 1) // m
    out = np.full(gaps.size + int(fillers.sum()), m, dtype=np.int64)
    out[np.cumsum(fillers + 1) - 1] = gaps - fillers * m - 1
    return out


def positions_from_gaps(symbols: np.ndarray, gap_bits: int) -> np.ndarray:
    m = 2**gap_bits - 1
    pos = np.cumsum(np.where(symbols == m, m, symbols + 1)) - 1
    return pos[symbols != m]


def _sparse_stream(positions: np.ndarray) -> tuple[dict[str, Any], bytes, int, int]:
    """The gap width with the smallest coded stream -> (descriptor, bytes, gap_bits, cost)."""
    top = int(np.diff(positions, prepend=-1).max()).bit_length() if positions.size else 1
    best = None
    for b in range(1, min(MAX_GAP_BITS, top + 1) + 1):
        desc, data, cost = _code_stream(gap_symbols(positions, b), 2**b)
        if best is None or cost < best[3]:
            best = (desc, data, b, cost)
    assert best is not None
    return best


# ---- encoding -----------------------------------------------------------------------

def _raw(values: np.ndarray, payload: _Payload) -> tuple[dict[str, Any], int]:
    if values.dtype == np.float32 and np.array_equal(values.astype(np.float16), values):
        values = values.astype(np.float16)  # exact in half precision: half the bytes
    dtype = values.dtype.newbyteorder("<")
    data = values.astype(dtype).tobytes()
    return {"enc": "raw", "dtype": dtype.str, **payload.add(data)}, len(data)


def _book(values: np.ndarray, positions: np.ndarray, size: int,
          hint: QuantizedTensor | None) -> tuple[dict[str, Any], np.ndarray, int] | None:
    """(book descriptor, labels, alphabet) when the values come from a small codebook."""
    if hint is not None:
        labels = hint.codes.reshape(-1)[positions].astype(np.int64) - hint.qmin
        rows = positions // max(size // hint.scale.size, 1)
        book = affine_codebook(hint.scale, hint.zero_point, hint.qmin, hint.qmax)
        if np.array_equal(book[rows % book.shape[0], labels], values):
            desc = {"kind": "affine", "scale": hint.scale.astype("<f4").tobytes(),
                    "zp": hint.zero_point.astype("<i4").tobytes(),
                    "qmin": hint.qmin, "qmax": hint.qmax}
            return desc, labels, hint.qmax - hint.qmin + 1
    if values.dtype != np.float32:
        return None
    uniq, labels = np.unique(values, return_inverse=True)
    if uniq.size > MAX_BOOK or not np.array_equal(uniq[labels], values):
        return None
    half = np.array_equal(uniq.astype(np.float16), uniq)
    desc = {"kind": "values", "dtype": "<f2" if half else "<f4",
            "values": uniq.astype("<f2" if half else "<f4").tobytes()}
    return desc, labels.astype(np.int64), int(uniq.size)


def _encode_entry(name: str, arr: np.ndarray, mask: np.ndarray | None,
                  hint: QuantizedTensor | None, payload: _Payload) -> tuple[dict, dict]:
    flat = arr.reshape(-1)
    rec: dict[str, Any] = {"name": name, "shape": list(arr.shape), "mask": mask is not None}
    stats: dict[str, Any] = {"name": name, "shape": list(arr.shape), "size": int(flat.size)}
    if mask is not None and not np.all(mask):
        positions = np.flatnonzero(mask.reshape(-1))
        desc, data, gap_bits, _ = _sparse_stream(positions)
        rec.update(layout="sparse", gap_bits=gap_bits, gaps={**desc, **payload.add(data)})
        stats.update(gap_bits=gap_bits, gap_symbols=int(desc["count"]), gap_bytes=len(data))
    else:
        positions = np.arange(flat.size, dtype=np.int64)
        rec["layout"] = "dense"
        stats.update(gap_bits=0, gap_symbols=0, gap_bytes=0)
    values = flat[positions]
    stats["kept"] = int(positions.size)
    mark = len(payload.chunks), payload.size
    rec["values"], raw_bytes = _raw(values, payload)
    stats.update(encoding="raw", value_bytes=raw_bytes)
    book = _book(values, positions, flat.size, hint) if values.size else None
    if book is not None:
        desc, labels, alphabet = book
        sdesc, sdata, _ = _code_stream(labels, alphabet)
        book_bytes = len(desc.get("values", b"")) + len(desc.get("scale", b"")) * 2
        if book_bytes + len(sdata) + (len(sdesc.get("lengths", b""))) < raw_bytes:
            payload.chunks, payload.size = payload.chunks[: mark[0]], mark[1]  # drop the raw
            rec["values"] = {"enc": "book", "book": desc, "index": {**sdesc, **payload.add(sdata)}}
            stats.update(encoding="book", book_size=alphabet, book_bytes=book_bytes,
                         index_coding=sdesc["coding"], index_bytes=len(sdata),
                         index_nbits=int(sdesc.get("nbits", len(sdata) * 8)),
                         index_width=int(max(alphabet - 1, 0)).bit_length(), value_bytes=0)
    return rec, stats


def encode_model(model: Module, quantized: dict[str, QuantizedTensor] | None = None,
                 meta: dict[str, Any] | None = None) -> tuple[bytes, dict[str, Any]]:
    """The .dcz bytes of ``model`` and size statistics (per tensor, header, total)."""
    quantized = quantized or {}
    params = dict(model.named_parameters())
    payload = _Payload()
    records, tensors = [], []
    for name, arr in model.state_dict().items():
        if name.endswith("_mask") and name[: -len("_mask")] in params:
            continue
        p = params.get(name)
        mask = None if p is None or p.mask is None else backend.to_host(p.mask) != 0
        rec, stats = _encode_entry(name, np.asarray(arr, order="C"), mask,
                                   quantized.get(name), payload)
        stats["kind"] = "param" if p is not None else "buffer"
        records.append(rec)
        tensors.append(stats)
    meta = json.loads(json.dumps(meta or {}, default=str))  # JSON-able, so msgpack-able too
    head = {"spec": model.to_spec(), "meta": meta, "tensors": records}
    header = zlib.compress(msgpack.packb(head, use_bin_type=True), 9)
    body = b"".join(payload.chunks)
    fixed = _FIXED.pack(MAGIC, VERSION, 0, len(header), len(body),
                        zlib.crc32(header), zlib.crc32(body))
    blob = fixed + header + body
    return blob, {"file_bytes": len(blob), "header_bytes": len(fixed) + len(header),
                  "payload_bytes": len(body), "tensors": tensors}


def save_dcz(path: str | Path, model: Module, quantized: dict[str, QuantizedTensor] | None = None,
             meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` to ``path``; returns the size statistics of ``encode_model``."""
    blob, stats = encode_model(model, quantized, meta)
    Path(path).write_bytes(blob)
    return stats


# ---- decoding -----------------------------------------------------------------------

def _slice(payload: bytes, ref: dict[str, Any], what: str) -> bytes:
    off, n = int(ref["off"]), int(ref["len"])
    if off < 0 or n < 0 or off + n > len(payload):
        raise DczError(f"{what}: stream [{off}, {off + n}) outside the payload ({len(payload)} B)")
    return payload[off : off + n]


def _decode_entry(rec: dict[str, Any], payload: bytes, dtype: Any) -> tuple[np.ndarray, Any]:
    name, shape = rec["name"], tuple(int(d) for d in rec["shape"])
    size = int(np.prod(shape, dtype=np.int64))
    if rec["layout"] == "sparse":
        bits = int(rec["gap_bits"])
        if not 1 <= bits <= MAX_GAP_BITS:
            raise DczError(f"{name}: gap width {bits} outside 1..{MAX_GAP_BITS}")
        gaps = _read_stream(rec["gaps"], _slice(payload, rec["gaps"], name), 2**bits)
        positions = positions_from_gaps(gaps, bits)
        if positions.size and (positions[-1] >= size or gaps[-1] == 2**bits - 1):
            raise DczError(f"{name}: sparse indices run past the tensor's {size} entries")
    else:
        positions = np.arange(size, dtype=np.int64)
    vals = rec["values"]
    if vals["enc"] == "raw":
        data = _slice(payload, vals, name)
        raw = np.frombuffer(data, dtype=np.dtype(vals["dtype"]))
        if raw.size != positions.size:
            raise DczError(f"{name}: {raw.size} raw values for {positions.size} entries")
        values = raw.astype(dtype)
    else:
        book = vals["book"]
        if book["kind"] == "values":
            table = np.frombuffer(book["values"], dtype=np.dtype(book["dtype"])).astype(np.float32)
            table = table[None, :]
            rows: Any = 0
        else:
            scale = np.frombuffer(book["scale"], dtype="<f4")
            zp = np.frombuffer(book["zp"], dtype="<i4")
            if scale.size != zp.size or scale.size not in (1, shape[0] if shape else 1):
                raise DczError(f"{name}: {scale.size} scales for {shape[:1]} channels")
            table = affine_codebook(scale, zp, int(book["qmin"]), int(book["qmax"]))
            rows = positions // max(size // scale.size, 1)
        if int(vals["index"]["count"]) != positions.size:
            raise DczError(f"{name}: {vals['index']['count']} indices for {positions.size} "
                           "entries")
        labels = _read_stream(vals["index"], _slice(payload, vals["index"], name),
                              table.shape[1])
        if labels.size and labels.max() >= table.shape[1]:
            raise DczError(f"{name}: index {labels.max()} outside a codebook of "
                           f"{table.shape[1]}")
        values = table[rows, labels].astype(dtype)
    full = np.zeros(size, dtype=dtype)
    full[positions] = values
    mask = None
    if rec["mask"]:
        mask = np.zeros(size, dtype=dtype)
        mask[positions] = 1
        mask = mask.reshape(shape)
    return full.reshape(shape), mask


def read_header(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """Validate the framing and checksums; returns (header, payload). Raises DczError."""
    if len(blob) < _FIXED.size or blob[:4] != MAGIC:
        raise DczError("not a .dcz file (bad magic bytes)" if len(blob) >= 4 else
                       f"not a .dcz file: only {len(blob)} bytes")
    magic, version, _flags, hlen, plen, hcrc, pcrc = _FIXED.unpack_from(blob)
    if version != VERSION:
        raise DczError(f"unsupported .dcz version {version} (this reader knows {VERSION})")
    expected = _FIXED.size + hlen + plen
    if len(blob) != expected:
        kind = "truncated" if len(blob) < expected else "has trailing bytes"
        raise DczError(f".dcz file {kind}: {len(blob)} bytes, the header says {expected}")
    header = blob[_FIXED.size : _FIXED.size + hlen]
    payload = blob[_FIXED.size + hlen :]
    if zlib.crc32(header) != hcrc:
        raise DczError(".dcz header corrupted (CRC32 mismatch)")
    if zlib.crc32(payload) != pcrc:
        raise DczError(".dcz payload corrupted (CRC32 mismatch)")
    try:
        head = msgpack.unpackb(zlib.decompress(header), raw=False, strict_map_key=False)
    except Exception as exc:  # zlib.error, msgpack's exceptions
        raise DczError(f".dcz header unreadable: {exc}") from None
    if not isinstance(head, dict) or not {"spec", "tensors"} <= set(head):
        raise DczError(".dcz header lacks the model spec or the tensor table")
    return head, payload


def load_dcz(path: str | Path) -> LoadedDcz:
    """Rebuild the model stored in ``path``; raises DczError on any inconsistency."""
    import distnet.nn  # noqa: F401 - registers the layer classes that from_spec looks up

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressed model not found: {path}")
    blob = path.read_bytes()
    head, payload = read_header(blob)
    try:
        model = from_spec(head["spec"])
    except (ValueError, TypeError, KeyError) as exc:
        raise DczError(f"cannot rebuild the model from the file's spec: {exc}") from None
    expected = model.state_dict()
    params = dict(model.named_parameters())
    names = [r["name"] for r in head["tensors"]]
    wanted = [k for k in expected if not (k.endswith("_mask") and k[:-5] in params)]
    if sorted(names) != sorted(wanted):
        raise DczError(f"tensors in the file {sorted(set(names) ^ set(wanted))} do not match "
                       "the model its spec builds")
    state: dict[str, np.ndarray] = {}
    for rec in head["tensors"]:
        name = rec["name"]
        if tuple(rec["shape"]) != tuple(expected[name].shape):
            raise DczError(f"{name}: shape {tuple(rec['shape'])} in the file, "
                           f"{tuple(expected[name].shape)} in the model")
        try:
            state[name], mask = _decode_entry(rec, payload, expected[name].dtype)
        except (KeyError, TypeError) as exc:
            raise DczError(f"{name}: malformed record ({exc})") from None
        except ValueError as exc:
            raise DczError(f"{name}: {exc}") from None
        if mask is not None:
            state[name + "_mask"] = mask
    model.load_state_dict(state)
    model.eval()
    return LoadedDcz(model, head.get("meta") or {}, {"file_bytes": len(blob)})
