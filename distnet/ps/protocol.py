"""The parameter-server wire format, in one file (documented in docs/protocol.md).

A message is a ZeroMQ multipart message ``[header, array_0, ..., array_{n-1}]``
(the server's ROUTER adds the peer's routing id in front). ``header`` is a msgpack
map; each array frame holds the raw little-endian bytes of one tensor, encoded by
the message's ``codec``. Metadata and data travel in separate frames so arrays are
never copied into or out of msgpack: senders pass NumPy buffers to ZeroMQ with
``copy=False`` and receivers wrap frames with ``np.frombuffer``.

A message can instead leave its arrays in a shared-memory segment (``shm.py``: a
worker and a server on one host): its header says ``"shm": true`` and lists no
keys, dtypes, shapes or meta (they are the segment's), and no array frames follow;
``decode`` is then given the segment's layout and buffers and checks them exactly
as it checks a header and its frames.

Receiving is defensive: ``decode`` unpacks the header with size limits, checks
the whole schema (op, version, field types, keys, dtypes from an allow-list,
shapes, codec metadata, frame count, every frame's byte length) and only then
makes arrays. Anything wrong raises ``ProtocolError`` naming the problem. There
is no pickle here, nor anywhere in distnet.ps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from distnet.ps.codecs import Payload, codec_class

PROTOCOL_VERSION = 1
REQUEST_OPS = ("register", "push", "pull", "push_pull", "clock", "barrier", "stats", "shutdown",
               "ping")
REPLY_OPS = (*REQUEST_OPS, "error")  # "error": a reply to a message whose op is unknown
STATUSES = ("ok", "error")
# Names on the wire -> the little-endian dtypes they denote. Nothing else is accepted.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in (("float16", "<f2"), ("float32", "<f4"), ("float64", "<f8"),
                       ("int8", "i1"), ("uint8", "u1"), ("int32", "<i4"), ("int64", "<i8"))
}
_INT_MAX = 2**63 - 1


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text names the problem."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied while decoding, before anything is allocated."""

    max_header_bytes: int = 1 << 20
    max_keys: int = 1 << 16
    max_ndim: int = 8
    max_elements: int = 2**31 - 1  # topk sends int32 indices
    max_message_bytes: int = 1 << 32
    max_str_len: int = 1 << 16
    max_map_len: int = 1 << 12
    # nesting of maps/lists: the deepest real header (a reply's stats) has 4 levels. Deeper
    # values are refused before anything formats them: repr() of a 1000-deep list raises
    # RecursionError, which no caller expects from an error message.
    max_depth: int = 12


DEFAULT_LIMITS = Limits()


@dataclass
class Entry:
    """One tensor on the wire: its key, decoded dtype and shape, payload and codec meta."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    payload: Payload
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Message:
    """A decoded, validated message. ``entries[i].payload`` are zero-copy frame views."""

    header: dict[str, Any]
    entries: list[Entry]
    nbytes: int  # all frames, header included
    shared: bool = False  # the arrays are views of a shared-memory segment: copy to keep

    @property
    def op(self) -> str:
        return self.header["op"]

    def arrays(self) -> dict[str, np.ndarray]:
        """key -> array, for codec 'none' (pull replies): views of the frames, no copy."""
        if self.header["codec"] != "none":
            raise ProtocolError(f"arrays() needs codec 'none', not {self.header['codec']!r}")
        return {e.key: e.payload[0].reshape(e.shape) for e in self.entries}


# ---- encoding -------------------------------------------------------------------------
def dense_entries(arrays: dict[str, np.ndarray]) -> list[Entry]:
    """Entries for codec 'none': each array as it is (made C-contiguous little-endian)."""
    out = []
    for key, arr in arrays.items():
        a = np.asarray(arr)
        a = a if a.flags.c_contiguous else a.copy(order="C")  # ascontiguousarray makes 0-d 1-d
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        out.append(Entry(key, a.dtype, tuple(a.shape), [a.reshape(-1)]))
    return out


_NAMES = {np.dtype(d): name for name, d in DTYPES.items()}  # dtype.name costs ~5 us a call


def dtype_name(dtype: np.dtype) -> str:
    name = _NAMES.get(dtype) if isinstance(dtype, np.dtype) else None
    if name is not None:
        return name
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ProtocolError(f"dtype {name} cannot travel; allowed: {sorted(DTYPES)}")
    return name


def encode(header: dict[str, Any], entries: list[Entry] = (), codec: str = "none", *,
           shared: bool = False) -> list[Any]:
    """Frames ``[header, array...]`` ready for ``send_multipart(copy=False)``.

    header: the op fields (op, wid, seq, ver, status, ...); ``v``, ``keys``,
    ``dtypes``, ``shapes``, ``codec`` and ``meta`` are filled in from ``entries``.
    A single-array payload is sent as the array itself (no copy); a multi-array
    payload (topk) is joined into one frame. shared: the arrays are in the shared
    segment already; only the header goes (``"shm": true``, no entry lists: the
    segment's layout stands for them, and ``entries`` are not read).
    """
    if shared:
        return [msgpack.packb({**header, "v": PROTOCOL_VERSION, "codec": codec, "shm": True},
                              use_bin_type=True)]
    h = dict(header)
    h["v"] = PROTOCOL_VERSION
    h["keys"] = [e.key for e in entries]
    h["dtypes"] = [dtype_name(e.dtype) for e in entries]
    h["shapes"] = [[int(d) for d in e.shape] for e in entries]
    h["codec"] = codec
    h["meta"] = [e.meta for e in entries]
    frames: list[Any] = [msgpack.packb(h, use_bin_type=True)]
    for e in entries:
        if len(e.payload) == 1:
            frames.append(np.ascontiguousarray(e.payload[0]))
        else:
            frames.append(b"".join(np.ascontiguousarray(p).data for p in e.payload))
    return frames


# ---- decoding -------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _need_int(h: dict, name: str, *, optional: bool = False) -> None:
    x = h.get(name)
    if x is None and optional:
        return
    if not _is_int(x) or not 0 <= x <= _INT_MAX:
        raise ProtocolError(f"field {name!r} must be a non-negative integer, got {x!r:.60}")


def _need_list(h: dict, name: str, n: int | None = None) -> list:
    x = h.get(name)
    if not isinstance(x, list):
        raise ProtocolError(f"field {name!r} must be a list, got {type(x).__name__}")
    if n is not None and len(x) != n:
        raise ProtocolError(f"field {name!r} has {len(x)} items, 'keys' has {n}")
    return x


def _frame_view(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", None)  # zmq.Frame: its memory, not a copy
    view = buf if buf is not None else memoryview(frame)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def validate_header(h: Any, frame_sizes: list[int], *, reply: bool = False,
                    limits: Limits = DEFAULT_LIMITS) -> list[tuple[np.dtype, tuple, list]]:
    """Check a decoded header against the schema and the frames that came with it.

    Returns per key ``(dtype, shape, payload layout)``. Raises ProtocolError.
    """
    _check_fields(h, reply)
    keys = _need_list(h, "keys")
    n = len(keys)
    if n > limits.max_keys:
        raise ProtocolError(f"{n} keys, limit {limits.max_keys}")
    dtypes, shapes, meta = (_need_list(h, f, n) for f in ("dtypes", "shapes", "meta"))
    codec_name = h.get("codec")
    if not isinstance(codec_name, str):
        raise ProtocolError("field 'codec' must be a string")
    if len(frame_sizes) != n:
        raise ProtocolError(f"{len(frame_sizes)} array frames for {n} keys")
    described = (keys, dtypes, shapes, meta, codec_name, frame_sizes, limits)
    specs = _SPECS.get(described)
    if specs is None or not all(type(d) is int for s in shapes for d in s):
        specs = _entry_specs(*described)
        _SPECS.put(described, specs)
    return specs


def _check_fields(h: Any, reply: bool) -> None:
    """The header's own fields: op, protocol version, ids, and a reply's status."""
    if not isinstance(h, dict):
        raise ProtocolError(f"header must be a map, got {type(h).__name__}")
    op = h.get("op")
    ops = REPLY_OPS if reply else REQUEST_OPS
    if op not in ops:
        raise ProtocolError(f"unknown op {op!r:.40}; known: {list(ops)}")
    if not _is_int(h.get("v")) or h["v"] != PROTOCOL_VERSION:  # True == 1.0 == 1 in Python
        raise ProtocolError(f"protocol version {h.get('v')!r:.20} not spoken here "
                            f"(this side speaks {PROTOCOL_VERSION})")
    for name in ("wid", "seq", "ver"):
        _need_int(h, name)
    if reply:
        if h.get("status") not in STATUSES:
            raise ProtocolError(f"reply status must be one of {STATUSES}, "
                                f"got {h.get('status')!r:.40}")
        if not isinstance(h.get("message", ""), str):
            raise ProtocolError("reply 'message' must be a string")
    if op == "pull":
        _need_int(h, "since", optional=True)
    if reply and h.get("shm") is True:
        _need_int(h, "pseq")


class _SpecCache:
    """The last few entry descriptions that passed ``_entry_specs``, with their specs.

    A worker sends the same keys, dtypes and shapes at every step, and checking them
    entry by entry is most of what decoding a header-only message costs (~50 us of
    ~70 us for lenet300's 6 tensors; a sync round decodes four). A description equal
    (``==``, element by element) to one checked before gets that one's specs, which
    hold the checked values themselves. ``==`` equates 1, 1.0 and True, so a hit also
    needs every dimension to be exactly an int (else the full check runs and names
    the problem); only codec ``none`` is kept, whose decoder reads no meta. Shared by
    threads: each operation on the list is atomic, and a lost insert is a later miss.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: list[tuple[tuple, list]] = []

    def get(self, described: tuple) -> list | None:
        for key, specs in self._items:
            if key == described:
                return specs
        return None

    def put(self, described: tuple, specs: list) -> None:
        if described[4] == "none":
            self._items = [(described, specs), *self._items[: self.size - 1]]


_SPECS = _SpecCache(8)


def _entry_specs(keys: list, dtypes: list, shapes: list, meta: list, codec_name: str,
                 frame_sizes: list[int], limits: Limits) -> list[tuple[np.dtype, tuple, list]]:
    """Check each entry's key, dtype, shape and codec meta against its frame's size."""
    n = len(keys)
    if not all(isinstance(k, str) and k for k in keys):
        raise ProtocolError("keys must be non-empty strings")
    if len(set(keys)) != n:
        raise ProtocolError("keys repeat")
    try:
        codec = codec_class(codec_name)
    except KeyError as exc:
        raise ProtocolError(str(exc.args[0])) from None
    out, total = [], 0
    for i, key in enumerate(keys):
        if dtypes[i] not in DTYPES:
            raise ProtocolError(f"key {key!r}: dtype {dtypes[i]!r:.30} not allowed; "
                                f"allowed: {sorted(DTYPES)}")
        dtype, shape = DTYPES[dtypes[i]], shapes[i]
        if (not isinstance(shape, list) or len(shape) > limits.max_ndim
                or not all(_is_int(d) and 0 <= d <= limits.max_elements for d in shape)):
            raise ProtocolError(f"key {key!r}: shape {shape!r:.60} is not a list of at most "
                                f"{limits.max_ndim} non-negative integers")
        if math.prod(shape) > limits.max_elements:
            raise ProtocolError(f"key {key!r}: {math.prod(shape)} elements, limit "
                                f"{limits.max_elements}")
        if not isinstance(meta[i], dict):
            raise ProtocolError(f"key {key!r}: codec meta must be a map")
        try:
            layout = codec.layout(meta[i], tuple(shape), dtype)
        except ValueError as exc:
            raise ProtocolError(f"key {key!r}: {exc}") from None
        expected = sum(count * dt.itemsize for dt, count in layout)
        if frame_sizes[i] != expected:
            parts = " + ".join(f"{count} x {dt.name}" for dt, count in layout)
            raise ProtocolError(f"key {key!r}: frame has {frame_sizes[i]} bytes, expected "
                                f"{expected} = {parts} for codec {codec_name!r}")
        total += expected
        out.append((dtype, tuple(shape), layout))
    if total > limits.max_message_bytes:
        raise ProtocolError(f"message of {total} bytes, limit {limits.max_message_bytes}")
    return out


def check_depth(obj: Any, limit: int) -> None:
    """Raise ProtocolError when maps/lists nest deeper than ``limit`` (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        x, depth = stack.pop()
        if depth > limit:
            raise ProtocolError(f"header nests deeper than {limit} levels")
        for c in x.values() if type(x) is dict else x:
            if type(c) is dict or type(c) is list:  # msgpack makes exactly these containers
                stack.append((c, depth + 1))


def unpack_header(raw: bytes | memoryview, limits: Limits = DEFAULT_LIMITS) -> Any:
    """msgpack -> Python, with every size and the nesting depth bounded, no extension types."""
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(raw)} bytes, limit {limits.max_header_bytes}")
    try:
        h = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limits.max_str_len, max_bin_len=limits.max_str_len,
            max_array_len=limits.max_keys, max_map_len=limits.max_map_len, max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises ValueError, ExtraData, FormatError, StackError...
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}"[:200]) \
            from None
    if isinstance(h, (dict, list)):
        check_depth(h, limits.max_depth)
    return h


def decode(frames: list[Any], *, reply: bool = False, limits: Limits = DEFAULT_LIMITS,
           shared: Callable[[dict[str, Any]], tuple[dict[str, list], list[Any]]] | None = None
           ) -> Message:
    """Validate and decode ``[header, array...]`` (zmq.Frame or bytes-like items).

    Arrays are zero-copy views of the frames (``np.frombuffer``), made only after
    the header and all frame sizes have been checked. shared: for a header with
    ``"shm": true``, gives the segment's layout (``keys``, ``dtypes``, ``shapes``,
    ``meta`` lists, which the header then holds) and the entries that stand for the
    array frames (``Segment.entries``: the segment's own views, made once; its layout
    was checked when it was made); it raises ProtocolError when the header does not
    fit the segment.
    """
    if not frames:
        raise ProtocolError("empty message")
    views = [_frame_view(f) for f in frames]
    header = unpack_header(views[0], limits)
    in_shm = isinstance(header, dict) and header.get("shm") is True
    if in_shm:
        if len(views) != 1:
            raise ProtocolError("a message with its arrays in shared memory has no array frames")
        if shared is None:
            raise ProtocolError("arrays in shared memory, but this side has no segment for them")
        listed = [k for k in _ENTRY_FIELDS if k in header]
        if listed:
            raise ProtocolError(f"a message with its arrays in shared memory lists no {listed}: "
                                "the segment's layout is its layout")
        layout, entries = shared(header)
        header.update(layout)
        _check_fields(header, reply)
        if header.get("codec") != "none":
            raise ProtocolError(f"arrays in shared memory are not compressed: codec must be "
                                f"'none', got {header.get('codec')!r:.20}")
        return Message(header, list(entries), views[0].nbytes, True)  # the list is the segment's
    specs = validate_header(header, [v.nbytes for v in views[1:]], reply=reply, limits=limits)
    entries = []
    for key, view, (dtype, shape, layout), meta in zip(
            header["keys"], views[1:], specs, header["meta"], strict=True):
        payload, offset = [], 0
        for dt, count in layout:
            payload.append(np.frombuffer(view, dtype=dt, count=count, offset=offset))
            offset += count * dt.itemsize
        entries.append(Entry(key, dtype, shape, payload, meta))
    return Message(header, entries, sum(v.nbytes for v in views))


_ENTRY_FIELDS = ("keys", "dtypes", "shapes", "meta")


def peek_fields(frames: list[Any]) -> dict[str, Any]:
    """Best-effort op/wid/seq of a message that failed to decode, to address the error reply."""
    try:
        h = unpack_header(_frame_view(frames[0]))
    except (ProtocolError, IndexError, TypeError):
        return {}
    if not isinstance(h, dict):
        return {}
    out: dict[str, Any] = {}
    for k in ("wid", "seq"):
        if _is_int(h.get(k)) and 0 <= h[k] <= _INT_MAX:
            out[k] = h[k]
    if h.get("op") in REQUEST_OPS:
        out["op"] = h["op"]
    return out
