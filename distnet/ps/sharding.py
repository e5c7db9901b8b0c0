"""Which server holds which parameter: a deterministic, byte-balanced plan.

``plan_shards(shapes, k)`` lays the parameters end to end (in the order given:
pass the model's ``named_parameters`` order) and cuts the line at every multiple
of ``total_bytes / k``. A cut that falls inside a large tensor splits it between
rows (axis 0), so a 4M-parameter embedding can spread over servers; a cut inside a
small or row-less tensor moves to that tensor's nearer end. Each server therefore
holds a contiguous run of whole tensors and row ranges, and every server is
within about half a row (or half a small tensor) of ``total / k`` per cut.

A split tensor is stored on its servers under the key ``name[start:stop]`` (rows
``start:stop``); whole tensors keep their name. ``plan_from_layouts`` rebuilds the
plan from those keys, so a client needs nothing but what the servers report.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

_PIECE_KEY = re.compile(r"^(?P<name>.+)\[(?P<start>\d+):(?P<stop>\d+)\]$")


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` of parameter ``name`` on ``server`` (whole if ``split`` is False)."""

    name: str
    server: int
    start: int
    stop: int
    split: bool

    @property
    def key(self) -> str:
        return f"{self.name}[{self.start}:{self.stop}]" if self.split else self.name


@dataclass(frozen=True)
class ShardPlan:
    """The pieces of every parameter, in parameter order then row order."""

    num_servers: int
    shapes: dict[str, tuple[int, ...]]
    pieces: tuple[Piece, ...]

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def server_pieces(self, server: int) -> list[Piece]:
        return [p for p in self.pieces if p.server == server]

    def server_keys(self, server: int) -> list[str]:
        return [p.key for p in self.server_pieces(server)]

    def server_shapes(self, server: int) -> dict[str, tuple[int, ...]]:
        """key -> shape of what ``server`` stores."""
        return {p.key: _piece_shape(self.shapes[p.name], p) for p in self.server_pieces(server)}

    def server_bytes(self, itemsize: int | dict[str, int] = 4) -> list[int]:
        loads = [0] * self.num_servers
        for p in self.pieces:
            size = itemsize[p.name] if isinstance(itemsize, dict) else itemsize
            loads[p.server] += math.prod(_piece_shape(self.shapes[p.name], p)) * size
        return loads


def key_name(key: str) -> str:
    """The parameter a server key belongs to (``"fc.weight[0:500]"`` -> ``"fc.weight"``)."""
    m = _PIECE_KEY.match(key)
    return m["name"] if m else key


def _piece_shape(shape: tuple[int, ...], piece: Piece) -> tuple[int, ...]:
    return (piece.stop - piece.start, *shape[1:]) if piece.split else tuple(shape)


def plan_shards(shapes: dict[str, tuple[int, ...]], k: int, *,
                itemsize: int | dict[str, int] = 4, min_split_bytes: int = 1 << 16,
                ) -> ShardPlan:
    """Assign each parameter, or row ranges of large ones, to one of ``k`` servers.

    shapes: name -> shape, in a fixed order (the plan depends on it).
    itemsize: bytes per element, one for all or per name.
    min_split_bytes: tensors smaller than this are never split.
    """
    if k < 1:
        raise ValueError(f"need at least one server, got k={k}")
    for name in shapes:
        if _PIECE_KEY.match(name):
            raise ValueError(f"parameter name {name!r} looks like a shard key 'name[a:b]'")
    sizes = [math.prod(s) * (itemsize[n] if isinstance(itemsize, dict) else itemsize)
             for n, s in shapes.items()]
    total = sum(sizes)
    cuts = [total * j / k for j in range(1, k)]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    # Each cut becomes a byte offset on a tensor end or a row boundary; a piece goes to
    # the server whose number is the count of cuts at or before the piece's start.
    placed: list[float] = []
    splits: dict[str, list[int]] = {}
    for c in cuts:
        for (name, shape), nbytes, offset in zip(shapes.items(), sizes, offsets, strict=True):
            if not offset < c < offset + nbytes:
                continue
            rows = shape[0] if shape else 1
            if len(shape) >= 1 and rows >= 2 and nbytes >= min_split_bytes:
                row_bytes = nbytes / rows
                row = min(rows - 1, max(1, round((c - offset) / row_bytes)))
                splits.setdefault(name, []).append(row)
                placed.append(offset + row * row_bytes)
            else:
                placed.append(offset if c - offset <= offset + nbytes - c else offset + nbytes)
            break
        else:  # the cut falls on a tensor boundary already
            placed.append(c)
    placed.sort()
    pieces = []
    for (name, shape), nbytes, offset in zip(shapes.items(), sizes, offsets, strict=True):
        bounds = sorted(set(splits.get(name, [])))
        rows = shape[0] if shape else 1
        row_bytes = nbytes / rows if rows else 0
        edges = [0, *bounds, rows]
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            start_byte = offset + a * row_bytes
            server = min(k - 1, sum(1 for c in placed if c <= start_byte + 1e-9))
            pieces.append(Piece(name, server, a, b, bool(bounds)))
    return ShardPlan(k, {n: tuple(s) for n, s in shapes.items()}, tuple(pieces))


def split(arrays: dict[str, np.ndarray], plan: ShardPlan) -> list[dict[str, np.ndarray]]:
    """Per server, key -> array (row ranges are views: no copy)."""
    missing = set(plan.shapes) - set(arrays)
    if missing:
        raise KeyError(f"arrays lack parameters {sorted(missing)}")
    out: list[dict[str, np.ndarray]] = [{} for _ in range(plan.num_servers)]
    for p in plan.pieces:
        arr = arrays[p.name]
        if tuple(arr.shape) != plan.shapes[p.name]:
            raise ValueError(f"{p.name}: shape {tuple(arr.shape)}, plan has {plan.shapes[p.name]}")
        out[p.server][p.key] = arr[p.start:p.stop] if p.split else arr
    return out


def gather(per_server: list[dict[str, np.ndarray]], plan: ShardPlan,
           out: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Reassemble name -> array from per-server dicts.

    Whole tensors are returned as they are (no copy) unless ``out`` names an array
    to copy into; split tensors are copied row range by row range into ``out[name]``
    or a new array.
    """
    result: dict[str, np.ndarray] = {}
    for p in plan.pieces:
        part = per_server[p.server][p.key]
        target = out.get(p.name) if out is not None else None
        if not p.split and target is None:
            result[p.name] = part
            continue
        if target is None:
            target = result.get(p.name)
            if target is None:
                target = np.empty(plan.shapes[p.name], dtype=part.dtype)
        result[p.name] = target
        put_piece(target, p, part)
    return result


def put_piece(target: np.ndarray, piece: Piece, part: np.ndarray) -> None:
    """Copy ``part`` (what ``piece``'s server holds) into the whole-tensor ``target``."""
    if piece.split:
        target[piece.start:piece.stop] = part
    else:
        target[...] = part


def plan_from_layouts(layouts: list[dict[str, tuple[int, ...]]]) -> ShardPlan:
    """The plan implied by what each server stores (key -> shape per server)."""
    shapes: dict[str, tuple[int, ...]] = {}
    ranges: dict[str, list[tuple[int, int, int]]] = {}
    for server, layout in enumerate(layouts):
        for key, shape in layout.items():
            m = _PIECE_KEY.match(key)
            if m is None:
                if key in shapes:
                    raise ValueError(f"parameter {key!r} is held by two servers")
                shapes[key] = tuple(shape)
                continue
            name, a, b = m["name"], int(m["start"]), int(m["stop"])
            if not shape or shape[0] != b - a:
                raise ValueError(f"shard {key!r} has shape {tuple(shape)}")
            shapes.setdefault(name, ())
            ranges.setdefault(name, []).append((a, b, server))
    pieces: list[Piece] = []
    for name in shapes:
        if name not in ranges:
            server = next(i for i, lay in enumerate(layouts) if name in lay)
            pieces.append(Piece(name, server, 0, shapes[name][0] if shapes[name] else 1, False))
            continue
        rs = sorted(ranges[name])
        rest = {tuple(layouts[s][f"{name}[{a}:{b}]"][1:]) for a, b, s in rs}
        gaps = any(x[1] != y[0] for x, y in zip(rs[:-1], rs[1:], strict=True))
        if len(rest) != 1 or rs[0][0] != 0 or gaps:
            raise ValueError(f"shards of {name!r} do not tile its rows: {rs}")
        shapes[name] = (rs[-1][1], *rest.pop())
        pieces.extend(Piece(name, s, a, b, True) for a, b, s in rs)
    return ShardPlan(len(layouts), shapes, tuple(pieces))
