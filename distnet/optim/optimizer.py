"""The optimizer base class: parameters, weight decay, clipping, masks and state.

An optimizer holds ``(name, Parameter)`` pairs and reads ``p.data``/``p.grad``
afresh at every ``step()``, so a caller (a parameter server) may rebind those
arrays between steps as long as the shapes stay the same. ``p.grad`` is only
read, never written: it may be a read-only buffer received from the network.

Per-parameter state lives in named *slots* (``momentum_buffer``, ``exp_avg``, ...)
of the parameter's shape, dtype and device, created on first use and moved when
the parameters move (``model.to("cuda")`` after the optimizer was built). Updates
are written in place with ``out=`` into the slots and into per-parameter work
buffers, because a fresh array of a large layer costs an mmap and page faults on
every step (see PERF-NOTES.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from distnet import backend
from distnet.nn.module import Parameter
from distnet.optim.clip import clip_coefficient, global_norm


def named_parameter_list(params: Any) -> list[tuple[str, Parameter]]:
    """Normalise a Module, a mapping/iterable of ``(name, Parameter)`` or of Parameters.

    Bare Parameters are named by their index (``"0"``, ``"1"``, ...). Raises
    ValueError on an empty list, a duplicate name or the same Parameter twice.
    """
    if hasattr(params, "named_parameters"):
        items = list(params.named_parameters())
    else:
        if isinstance(params, Mapping):
            params = params.items()
        if isinstance(params, Parameter) or not isinstance(params, Iterable):
            raise TypeError("params must be a Module or an iterable of Parameters or of "
                            f"(name, Parameter) pairs, got {type(params).__name__}")
        items = []
        for i, item in enumerate(params):
            name, p = (item if isinstance(item, tuple) else (str(i), item))
            if not isinstance(p, Parameter):
                raise TypeError(f"params item {i} is {type(p).__name__}, not a Parameter")
            items.append((str(name), p))
    if not items:
        raise ValueError("the optimizer got an empty parameter list")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate parameter names {dup}")
    if len({id(p) for _, p in items}) != len(items):
        raise ValueError("the same Parameter appears twice in the optimizer's parameters")
    return items


class Optimizer:
    """Base class: ``step()`` updates every parameter in place from its ``.grad``.

    lr: the current learning rate (a schedule may set ``opt.lr`` before each step).
    weight_decay: L2 penalty added to the gradient (``g + wd * p``, PyTorch's way).
    clip_norm: when set, gradients are scaled so their global L2 norm (over all
    parameters, masked entries excluded) is at most this, before weight decay.
    Masks: where ``p.mask == 0`` the gradient counts as zero and ``p.data`` is
    re-zeroed after the update, so pruned weights stay 0 under momentum.

    Subclasses set ``name`` and ``slots`` and implement ``_update``.
    """

    name = "optimizer"

    def __init__(self, params: Any, lr: float, weight_decay: float = 0.0,
                 clip_norm: float | None = None) -> None:
        self.params = named_parameter_list(params)
        _check(lr >= 0, f"lr must be >= 0, got {lr}")
        _check(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
        _check(clip_norm is None or clip_norm > 0, f"clip_norm must be > 0, got {clip_norm}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.clip_norm = None if clip_norm is None else float(clip_norm)
        self.step_count = 0
        self.last_grad_norm: float | None = None  # before clipping, when clip_norm is set
        self.state: dict[str, dict[str, Any]] = {n: {} for n, _ in self.params}
        self._work: dict[str, dict[str, Any]] = {n: {} for n, _ in self.params}

    # ---- hooks for subclasses ------------------------------------------------------
    @property
    def slots(self) -> tuple[str, ...]:
        """Names of the per-parameter state arrays this optimizer keeps."""
        return ()

    def hyper(self) -> dict[str, Any]:
        """Optimizer-specific constructor arguments (for ``get_config``)."""
        return {}

    def _update(self, name: str, p: Parameter, g: Any, xp: Any) -> None:
        """Apply one update to ``p.data`` from the effective gradient ``g`` (do not modify g
        unless it is this parameter's ``"g"`` work buffer)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement _update")

    # ---- the step -------------------------------------------------------------------
    def step(self) -> None:
        """One update of every parameter from its ``.grad``, in place."""
        grads = self._effective_grads()  # validates the gradients before anything changes
        self.step_count += 1
        for (name, p), g in zip(self.params, grads, strict=True):
            xp = backend.get_array_module(p.data)
            self._ensure_state(name, p)
            self._update(name, p, g, xp)
            if p.mask is not None:
                p.data *= p.mask

    def step_sum(self, parts: list[Mapping[str, Any]], scale: float = 1.0) -> None:
        """One update from the gradient ``scale * sum(parts)``, each part mapping every
        parameter name to an array of its shape (only read): a server's step from the
        mean of its workers' gradients without summing them first where the optimizer
        can fold the sum into its own passes (SGD). Here: summed into a work buffer."""
        if not parts:
            raise ValueError("step_sum needs at least one gradient")
        for name, p in self.params:
            arrays = _part_arrays(parts, name, p)
            if len(arrays) == 1 and scale == 1.0:
                p.grad = arrays[0]
                continue
            xp = backend.get_array_module(p.data)
            total = self.work(name, "sum", p.data)
            if len(arrays) == 1:
                xp.multiply(arrays[0], scale, out=total)
            else:
                xp.add(arrays[0], arrays[1], out=total)
                for a in arrays[2:]:
                    total += a
                if scale != 1.0:
                    total *= scale
            p.grad = total
        self.step()

    def prepare_sum(self, parts: list[Mapping[str, Any]], scale: float = 1.0) -> None:
        """Say that ``step_sum(parts + more parts, scale)`` comes next, so that an
        optimizer may start on it while the rest arrive (SGD with momentum does) without
        changing the parameters or its state; the result of the step is the same bit for
        bit either way. Here: nothing."""

    def _effective_grads(self) -> list[Any]:
        """``coef * (g * mask) + wd * p`` per parameter, built in the ``"g"`` work buffer
        only where needed (plain ``p.grad`` otherwise, which is then only read)."""
        grads = []
        for name, p in self.params:
            if p.grad is None or tuple(p.grad.shape) != tuple(p.data.shape):
                got = None if p.grad is None else tuple(p.grad.shape)
                raise ValueError(f"parameter {name!r}: grad shape {got} != data shape {p.shape}")
            g = p.grad
            if p.mask is not None:
                xp = backend.get_array_module(p.data)
                g = xp.multiply(g, p.mask, out=self.work(name, "g", p.data))
            grads.append(g)
        coef = 1.0
        if self.clip_norm is not None:
            self.last_grad_norm = global_norm(grads)
            coef = clip_coefficient(self.last_grad_norm, self.clip_norm)
        if coef == 1.0 and self.weight_decay == 0.0:
            return grads
        wd = self.weight_decay
        for i, (name, p) in enumerate(self.params):
            xp = backend.get_array_module(p.data)
            buf = self.work(name, "g", p.data)
            g = grads[i]
            if coef != 1.0:
                xp.multiply(g, coef, out=buf)
                if wd:
                    buf += xp.multiply(p.data, wd, out=self.work(name, "s", p.data))
            elif wd:
                if g is buf:  # masked gradient already in buf: add wd * p via the scratch
                    buf += xp.multiply(p.data, wd, out=self.work(name, "s", p.data))
                else:
                    xp.multiply(p.data, wd, out=buf)
                    buf += g
            grads[i] = buf
        return grads

    # ---- buffers and state ----------------------------------------------------------
    def work(self, name: str, key: str, like: Any) -> Any:
        """A scratch array shaped like ``like`` kept across steps (contents undefined)."""
        buf = self._work[name].get(key)
        if buf is None or type(buf) is not type(like) or buf.shape != like.shape \
                or buf.dtype != like.dtype:
            buf = backend.get_array_module(like).empty_like(like)
            self._work[name][key] = buf
        return buf

    def _ensure_state(self, name: str, p: Parameter) -> dict[str, Any]:
        """The slots of ``name``: zeros on first use, moved to where ``p.data`` lives."""
        st = self.state[name]
        data = p.data
        for slot in self.slots:
            arr = st.get(slot)
            if arr is None:
                st[slot] = backend.get_array_module(data).zeros_like(data)
            elif type(arr) is not type(data):
                st[slot] = backend.to_device(arr, backend.device_of(data))
        return st

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of the state: ``"<param>/<slot>"`` arrays and ``"step"`` (int64)."""
        out: dict[str, np.ndarray] = {"step": np.array(self.step_count, dtype=np.int64)}
        for name, p in self.params:
            for slot, arr in self._ensure_state(name, p).items():
                out[f"{name}/{slot}"] = backend.to_host(arr).copy()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output in place; validates every key and shape first.

        Raises KeyError naming missing/unexpected keys and ValueError naming a shape
        mismatch, before anything changes.
        """
        shapes = {f"{n}/{s}": p.shape for n, p in self.params for s in self.slots}
        expected = set(shapes) | {"step"}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise KeyError(f"{type(self).__name__} state does not match its parameters: "
                           f"missing {missing}, unexpected {unexpected}")
        for key, shape in shapes.items():
            got = tuple(np.shape(state[key]))
            if got != shape:
                raise ValueError(f"optimizer state {key!r}: shape {got}, parameter has {shape}")
        step = np.asarray(state["step"])
        if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
            raise ValueError(f"optimizer state 'step' must be a non-negative integer scalar, "
                             f"got {step!r}")
        for name, p in self.params:
            st = self._ensure_state(name, p)
            for slot in self.slots:
                arr = st[slot]
                arr[...] = backend.get_array_module(arr).asarray(state[f"{name}/{slot}"],
                                                                 dtype=arr.dtype)
        self.step_count = int(step)

    def get_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments (``build_optimizer(name, params, **config)``)."""
        return {"lr": self.lr, "weight_decay": self.weight_decay,
                "clip_norm": self.clip_norm, **self.hyper()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({len(self.params)} parameters, {args})"


def _part_arrays(parts: list[Mapping[str, Any]], name: str, p: Parameter) -> list[Any]:
    """Parameter ``name``'s array in each part of ``step_sum``, shapes checked."""
    arrays = []
    for i, part in enumerate(parts):
        a = part.get(name)
        if a is None or tuple(a.shape) != tuple(p.data.shape):
            got = None if a is None else tuple(a.shape)
            raise ValueError(f"parameter {name!r}: gradient part {i} has shape {got}, the "
                             f"parameter {p.shape}")
        arrays.append(a)
    return arrays


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
