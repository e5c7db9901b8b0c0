"""Reading replies on the worker: the servers' layout, pulled parameters, stats, errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from distnet.ps.protocol import DTYPES, Message
from distnet.ps.sharding import ShardPlan, gather, key_name, plan_from_layouts, put_piece


class PSError(RuntimeError):
    """A server answered a request with an error (the text is the server's).

    codes: server id -> the reply's ``code`` (``aborted``, ``timeout``, ``refused``...).
    """

    def __init__(self, message: str, codes: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.codes = dict(codes or {})


@dataclass(frozen=True)
class Layout:
    """What the servers hold, as ``register`` reports it.

    names: parameter names in order; shapes/dtypes: name -> full shape/dtype;
    version: the (lowest) server version; plan: which server holds which rows.
    """

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    version: int
    plan: ShardPlan
    mode: str
    num_workers: int
    staleness: int


def int_keys(stats: dict[str, Any]) -> dict[str, Any]:
    """Stats maps keyed by worker id or staleness travel with string keys; restore ints."""
    out = dict(stats)
    for field in ("clocks", "staleness_hist", "lost"):
        if isinstance(out.get(field), dict):
            out[field] = {int(k): v for k, v in out[field].items()}
    return out


def valid_layout(lay: Any) -> bool:
    """Whether a register reply's ``layout`` has the keys, shapes and dtypes lists that
    the client reads (shapes themselves are checked where they are used)."""
    return (isinstance(lay, dict) and all(isinstance(lay.get(f), list)
                                          for f in ("keys", "shapes", "dtypes"))
            and len(lay["keys"]) == len(lay["shapes"]) == len(lay["dtypes"])
            and all(d in DTYPES for d in lay["dtypes"]))


def layout_from(replies: list[Message], version: int) -> Layout:
    """The Layout of every server's ``register`` reply (in server order)."""
    layouts, dtypes = [], {}
    for i, m in enumerate(replies):
        lay = m.header.get("layout")
        if not valid_layout(lay):
            raise PSError(f"server {i} sent a malformed layout in its register reply")
        layouts.append({k: tuple(s) for k, s in zip(lay["keys"], lay["shapes"], strict=True)})
        for k, d in zip(lay["keys"], lay["dtypes"], strict=True):
            dtypes[key_name(k)] = DTYPES[d]
    plan = plan_from_layouts(layouts)
    first = replies[0].header["layout"]
    return Layout(plan.names, dict(plan.shapes), {n: dtypes[n] for n in plan.names}, version,
                  plan, str(first.get("mode")), int(first.get("num_workers", 0)),
                  int(first.get("staleness", 0)))


def scatter_reply(plan: ShardPlan, server: int, msg: Message,
                  out: dict[str, np.ndarray]) -> bool:
    """Copy server ``server``'s parameters from its pull reply into ``out`` (the names
    ``out`` has) as soon as the reply is in, while other servers' replies still arrive.
    False when there was nothing to copy (an error or 'not modified' reply)."""
    if msg.header.get("status") != "ok" or msg.header.get("not_modified"):
        return False
    arrays = msg.arrays()
    for p in plan.server_pieces(server):
        if p.name in out:
            put_piece(out[p.name], p, arrays[p.key])
    return True


def gather_replies(plan: ShardPlan, replies: list[Message], out: dict[str, np.ndarray] | None,
                   copied: frozenset[int] | set[int] = frozenset()) -> dict[str, np.ndarray]:
    """name -> array from every server's pull reply (a 'not modified' server adds nothing:
    only names whose every piece came back are returned). ``copied``: servers whose
    replies ``scatter_reply`` has already copied into ``out``."""
    fresh = {i for i, m in enumerate(replies) if not m.header.get("not_modified")}
    if not fresh:
        return {}
    if len(fresh) < len(replies):
        names = {p.name for p in plan.pieces} - {
            p.name for p in plan.pieces if p.server not in fresh}
        plan = ShardPlan(plan.num_servers, {n: s for n, s in plan.shapes.items() if n in names},
                         tuple(p for p in plan.pieces if p.name in names))
    if copied and out is not None:
        rest = tuple(p for p in plan.pieces if p.server not in copied or p.name not in out)
        if not rest:  # everything is in out already (shared memory: often out itself)
            return {n: out[n] for n in plan.names}
        plan = ShardPlan(plan.num_servers, plan.shapes, rest)
    per_server = [m.arrays() if i in fresh else {} for i, m in enumerate(replies)]
    result = gather(per_server, plan, out)
    if not copied or out is None:
        return result
    return {n: result[n] if n in result else out[n] for n in plan.names}


def raise_errors(op: str, replies: dict[int, Message], addresses: list[str]) -> None:
    """PSError quoting every server that answered ``op`` with an error (none: nothing)."""
    bad = {i: m for i, m in sorted(replies.items()) if m.header["status"] == "error"}
    if bad:
        text = "; ".join(f"server {i} ({addresses[i]}): {m.header.get('message', '')}"
                         for i, m in bad.items())
        raise PSError(f"{op} failed: {text}",
                      {i: str(m.header.get("code", "")) for i, m in bad.items()})
