"""What one server shard holds: parameters, their optimizer and the update rule.

The server wraps each array in a ``Parameter`` and runs any distnet optimizer
over them. A gradient is never copied on its way in when it can be avoided:
``decode`` returns views of the received frames (codec ``none``) which become
``p.grad`` directly (optimizers only read ``.grad``); other codecs decode into one
scratch buffer per key. Everything is checked (keys, shapes, dtypes, codec
payload, finiteness) before anything changes, so a rejected push leaves the state
exactly as it was. Non-finite gradients are refused (``nonfinite="reject"``) or
have their NaN/inf entries set to zero (``"clip"``); both are counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from distnet.nn.module import Parameter
from distnet.ps.codecs import Codec, codec_class
from distnet.ps.protocol import DTYPES, Message, ProtocolError

OptimizerSpec = str | Callable[..., Any]
NONFINITE = ("reject", "clip")


def all_finite(g: np.ndarray) -> bool:
    """True when no entry is NaN or inf.

    A dot product is one BLAS pass that propagates NaN/inf (about 3x faster than
    ``isfinite().all()`` on 4M floats); only an inf from overflowing the sum of
    squares of huge finite values falls back to the exact test.
    """
    flat = g.reshape(-1)
    if g.dtype in (np.float32, np.float64) and math.isfinite(float(np.dot(flat, flat))):
        return True
    return bool(np.isfinite(g).all())


def build_server_optimizer(optimizer: OptimizerSpec, params: list[tuple[str, Parameter]],
                           config: dict[str, Any]) -> Any:
    """``optimizer`` is a distnet optimizer name, or a factory ``f(params, **config)``."""
    if callable(optimizer):
        return optimizer(params, **config)
    from distnet.optim import build_optimizer  # noqa: PLC0415 - optim imports nn; keep ps light

    return build_optimizer(optimizer, params, **config)


def build_server_schedule(schedule: dict[str, Any] | Callable[[int], float] | None,
                          base_lr: float) -> Callable[[int], float] | None:
    """None, a callable ``step -> lr``, or ``{"name": ..., "total_steps": ..., **kw}``."""
    if schedule is None or callable(schedule):
        return schedule
    from distnet.optim import build_schedule  # noqa: PLC0415

    spec = dict(schedule)
    name = spec.pop("name", "constant")
    total = spec.pop("total_steps")
    return build_schedule(name, spec.pop("base_lr", base_lr), total, **spec)


class ServerState:
    """Parameters (copied, C-contiguous, owned by the server), optimizer and version.

    version: the number of updates applied so far; the schedule is evaluated at it.
    """

    def __init__(self, params: dict[str, np.ndarray], *, optimizer: OptimizerSpec = "sgd",
                 optimizer_config: dict[str, Any] | None = None,
                 schedule: dict[str, Any] | Callable[[int], float] | None = None,
                 check_finite: bool = True, nonfinite: str = "reject") -> None:
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.arrays: dict[str, np.ndarray] = {}
        for key, value in params.items():
            arr = np.array(value, copy=True, order="C")
            if arr.dtype.name not in DTYPES or arr.dtype.kind != "f":
                raise ValueError(f"parameter {key!r}: dtype {arr.dtype} is not a float type "
                                 f"that can travel ({sorted(DTYPES)})")
            self.arrays[key] = arr
        self.params = {k: Parameter(a, k) for k, a in self.arrays.items()}
        config = dict(optimizer_config or {})
        # a shard can be empty (more servers than tensors): it keeps versions, no optimizer
        self.optimizer = (build_server_optimizer(optimizer, list(self.params.items()), config)
                          if self.params else None)
        self.base_lr = float(self.optimizer.lr if self.optimizer else config.get("lr", 0.0))
        self.schedule = build_server_schedule(schedule, self.base_lr)
        self.check_finite, self.nonfinite = check_finite, nonfinite
        self.nonfinite_gradients = 0  # gradients that had NaN/inf entries (refused or clipped)
        self.nonfinite_entries = 0  # entries set to zero by nonfinite="clip"
        self.version = 0
        self.segment: Any = None  # a shm.Segment holding the arrays: writes go under its seqlock
        self.update_seconds = 0.0  # time spent in optimizer steps (for stats; not preparing)
        self._decoders: dict[str, Codec] = {}
        self._scratch: dict[str, np.ndarray] = {}
        # sync accumulation: a round's gradients are held by reference where that is safe
        # (``accumulate``) and summed inside the optimizer's step (``step_sum``); the rest
        # are summed into _acc as they arrive
        self._acc: dict[str, np.ndarray] = {}
        self._summed = 0  # gradients in _acc
        self._held: dict[int, dict[str, np.ndarray]] = {}  # worker id -> its gradient
        self._slot_owners: set[int] = set()  # workers whose slot a held gradient is
        self._copies: dict[int, dict[str, np.ndarray]] = {}  # slots answered early (answering)

    def layout(self) -> dict[str, Any]:
        return {"keys": list(self.arrays),
                "shapes": [list(a.shape) for a in self.arrays.values()],
                "dtypes": [a.dtype.name for a in self.arrays.values()]}

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def current_lr(self, version: int | None = None) -> float:
        v = self.version if version is None else version
        return float(self.schedule(v)) if self.schedule is not None else self.base_lr

    # ---- receiving gradients ----------------------------------------------------------
    def decode(self, msg: Message) -> tuple[dict[str, np.ndarray], bool]:
        """Checked gradients key -> array, and whether they are views that may be held
        by reference (``accumulate``): True for received frames and for a worker's
        shared-memory slot; False for scratch buffers. Raises ProtocolError."""
        keys = [e.key for e in msg.entries]
        if set(keys) != set(self.arrays):
            unknown = sorted(set(keys) - set(self.arrays))
            missing = sorted(set(self.arrays) - set(keys))
            raise ProtocolError(f"gradient keys do not match this server: unknown {unknown[:5]}, "
                                f"missing {missing[:5]}")
        name = msg.header["codec"]
        decoder = self._decoders.get(name)
        if decoder is None:
            decoder = self._decoders[name] = codec_class(name)()
        views = name == "none"  # frames or slot, read in place: no copy on the way in
        grads: dict[str, np.ndarray] = {}
        for e in msg.entries:
            target = self.arrays[e.key]
            if e.dtype != target.dtype or e.shape != target.shape:
                raise ProtocolError(f"gradient {e.key!r} is {e.shape} {e.dtype.name}, the "
                                    f"parameter is {target.shape} {target.dtype.name}")
            out = None if views else self._scratch_for(e.key)
            try:
                g = decoder.decompress(e.payload, e.meta, e.shape, e.dtype, out)
            except ValueError as exc:
                raise ProtocolError(f"gradient {e.key!r}: {exc}") from None
            if self.check_finite and not all_finite(g):
                g = self._nonfinite(e.key, g)
                views = False  # g now lives in a scratch buffer
            grads[e.key] = g
        return grads, views

    def _nonfinite(self, key: str, g: np.ndarray) -> np.ndarray:
        self.nonfinite_gradients += 1
        if self.nonfinite == "reject":
            raise ProtocolError(f"gradient {key!r} has NaN or inf entries")
        out = self._scratch_for(key)
        if out is not g:
            np.copyto(out, g)  # frames are read-only, and other keys may still be views
        bad = ~np.isfinite(out)
        self.nonfinite_entries += int(bad.sum())
        out[bad] = 0
        return out

    def _scratch_for(self, key: str) -> np.ndarray:
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = np.empty_like(self.arrays[key])
        return buf

    # ---- updating ---------------------------------------------------------------------
    def apply(self, grads: dict[str, np.ndarray], lr_scale: float = 1.0) -> None:
        """One optimizer step from ``grads`` (aliased as ``p.grad``, not copied)."""
        def step(opt: Any) -> None:
            for key, g in grads.items():
                self.params[key].grad = g
            opt.step()

        self._update(step, lr_scale)

    def _update(self, step: Callable[[Any], None], lr_scale: float = 1.0) -> None:
        t0 = time.perf_counter()
        if self.optimizer is not None:
            self.optimizer.lr = self.current_lr() * lr_scale
            if self.segment is not None:
                with self.segment.writing():
                    step(self.optimizer)
            else:
                step(self.optimizer)
        self.version += 1
        self.update_seconds += time.perf_counter() - t0

    @property
    def accumulated(self) -> int:
        """Gradients in the current sync round."""
        return self._summed + len(self._held)

    def accumulate(self, grads: dict[str, np.ndarray], views: bool, wid: int,
                   slot: bool = False) -> None:
        """Add worker ``wid``'s gradient to the round (sync mode).

        Views are held, not copied: received frames belong to nobody else, and a
        worker writes its shared-memory slot (``slot``) only once it has been answered,
        which is at the end of the round unless ``answering`` says otherwise first.
        Everything else is summed now (its buffers are reused).
        """
        if views:
            self._held[wid] = grads
            if slot:
                self._slot_owners.add(wid)
        else:
            self._add(grads)

    def _add(self, grads: dict[str, np.ndarray]) -> None:
        for key, g in grads.items():
            if self._summed:
                self._acc[key] += g
            else:
                np.copyto(self._acc_for(key), g)
        self._summed += 1

    def answering(self, wid: int) -> None:
        """Worker ``wid`` is being answered and may write its slot again: if the round
        holds that slot, keep a copy instead (the normal round end applies first and
        finds nothing held; this is for early answers: errors, timeouts, replays). The
        copy stays a gradient of its own, so the step's arithmetic is the same."""
        if wid in self._slot_owners:
            self._slot_owners.discard(wid)
            copies = self._copies.setdefault(wid, {})
            for key, g in self._held[wid].items():
                if key not in copies:
                    copies[key] = np.empty_like(g)
                np.copyto(copies[key], g)
            self._held[wid] = dict(copies)

    def _acc_for(self, key: str) -> np.ndarray:
        buf = self._acc.get(key)
        if buf is None:
            buf = self._acc[key] = np.empty_like(self.arrays[key])
        return buf

    def round_sum(self) -> dict[str, np.ndarray] | None:
        """The sum of this round's gradients so far (None when empty), for checkpoints;
        a new dict of new arrays (the round goes on as it was)."""
        if self.accumulated == 0:
            return None
        parts = self._round_parts()
        return {k: sum((p[k] for p in parts[1:]), parts[0][k].copy()) for k in self.arrays}

    def _round_parts(self) -> list[dict[str, np.ndarray]]:
        """What the round's mean is made of: the running sum, then what is held in worker
        order (so the result does not depend on who arrived first)."""
        return ([self._acc] if self._summed else []) + [self._held[w] for w in sorted(self._held)]

    def restore_round(self, total: dict[str, np.ndarray], n: int) -> None:
        """Resume a round that had ``n`` gradients summing to ``total``."""
        for key, g in total.items():
            np.copyto(self._acc_for(key), g)
        self._held.clear()
        self._slot_owners.clear()
        self._summed = int(n)

    def detach(self) -> None:
        """Give every parameter a fresh copy of its array, leaving the old arrays to
        replies still being sent (a peer that reads slowly must not stall updates).
        The parameters leave a shared segment too (its readers then get frames)."""
        self.relocate({key: arr.copy() for key, arr in self.arrays.items()})
        self.segment = None

    def relocate(self, arrays: dict[str, np.ndarray]) -> None:
        """Keep the parameters in ``arrays`` from now on (same keys, already holding the
        values): fresh copies, or views of a shared-memory segment."""
        for key, arr in arrays.items():
            self.arrays[key] = arr
            self.params[key].data = arr

    def prepare_round(self, pending: set[int]) -> None:
        """Let the optimizer start on the round's step while the workers in ``pending``
        have still to push (``Optimizer.prepare_sum``): with the gradients it will
        take first, those held from workers below every pending one, and the mean's
        scale if nobody is lost. The step's result is the same either way."""
        if self.optimizer is None or not pending:
            return
        first = min(pending)
        prefix = [] if self._summed else [self._held[w] for w in sorted(self._held) if w < first]
        self.optimizer.prepare_sum(prefix, 1.0 / (self.accumulated + len(pending)))

    def apply_accumulated(self) -> int:
        """One step from the mean of the round's gradients (the optimizer sums what is
        held as it goes: ``Optimizer.step_sum``); returns how many it averaged."""
        n = self.accumulated
        if n == 0:
            raise RuntimeError("no gradient accumulated")
        parts = self._round_parts()
        self._update(lambda opt: opt.step_sum(parts, 1.0 / n))
        self._held.clear()
        self._slot_owners.clear()
        self._summed = 0
        return n
