"""Weight sharing (Deep Compression, stage 2): per-layer 1-D k-means and centroid fine-tuning.

Each layer's surviving weights (mask 1, or all when unpruned) are clustered into
``2 ** bits`` shared values; the layer then stores one small index per weight and
a codebook. Fine-tuning trains the *centroids*: the gradient of a centroid is the
sum of the gradients of the weights that share it, and after every update the
weights are rewritten from the centroids, so they stay exactly codebook values.

The 1-D k-means sorts the values once; with sorted centroids, cluster ``j`` is the
run of sorted values between two midpoints, found by ``np.searchsorted``, and its
sum and count come from prefix sums. An iteration is O(k log n) after an
O(n log n) sort: 266k weights cluster in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distnet import backend
from distnet.nn.module import Module, Parameter

INITS = ("linear", "random", "density")


@dataclass
class KMeans1D:
    """A 1-D k-means result: centroids (k,) float32 ascending, labels (n,) int64.

    ``history`` holds the sum of squared errors after each iteration
    (non-increasing); ``iterations`` how many Lloyd steps ran.
    """

    centroids: np.ndarray
    labels: np.ndarray
    history: list[float] = field(default_factory=list)
    iterations: int = 0

    @property
    def inertia(self) -> float:
        return self.history[-1] if self.history else 0.0


def init_centroids(sorted_values: np.ndarray, k: int, init: str = "linear",
                   seed: int | None = 0) -> np.ndarray:
    """Initial centroids (k,) float64 ascending from ``sorted_values`` (n,) ascending.

    linear: evenly spaced over [min, max] (the paper's choice: it keeps centroids
    for the rare large weights, which matter most); random: k distinct samples
    (Forgy); density: evenly spaced quantiles of the values' CDF.
    """
    v = sorted_values
    if init == "linear":
        return np.linspace(v[0], v[-1], k)
    if init == "density":
        return v[np.minimum(((np.arange(k) + 0.5) / k * v.size).astype(np.int64), v.size - 1)]
    if init == "random":
        rng = np.random.default_rng(seed)
        return np.sort(v[rng.choice(v.size, size=k, replace=False)])
    raise ValueError(f"unknown k-means init {init!r}: expected one of {', '.join(INITS)}")


def kmeans_1d(values: Any, k: int, init: str = "linear", max_iter: int = 300,
              tol: float = 1e-7, seed: int | None = 0) -> KMeans1D:
    """Cluster ``values`` (any shape, flattened) into at most ``k`` sorted centroids.

    With no more distinct values than ``k`` the centroids are those values (exact).
    Stops when no centroid moves by more than ``tol`` times the value range.
    """
    if k < 1:
        raise ValueError(f"k-means needs k >= 1, got {k}")
    v = np.asarray(backend.to_host(values), dtype=np.float64).ravel()
    if v.size == 0:
        return KMeans1D(np.zeros(0, np.float32), np.zeros(0, np.int64))
    s = np.sort(v)
    distinct = s[np.r_[True, s[1:] != s[:-1]]]
    if distinct.size <= k:
        c32 = distinct.astype(np.float32)
        return KMeans1D(c32, _nearest(v, c32), [0.0], 0)
    csum = np.concatenate([[0.0], np.cumsum(s)])
    csq = np.concatenate([[0.0], np.cumsum(s * s)])
    c = init_centroids(s if init != "random" else distinct, k, init, seed)
    history: list[float] = []
    scale = max(s[-1] - s[0], 1e-30)
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is reported
        bounds = np.concatenate([[0], np.searchsorted(s, (c[:-1] + c[1:]) / 2), [s.size]])
        n = np.diff(bounds)
        sums = csum[bounds[1:]] - csum[bounds[:-1]]
        new = np.where(n > 0, sums / np.maximum(n, 1), c)  # an empty cluster keeps its value
        sq = csq[bounds[1:]] - csq[bounds[:-1]]
        history.append(float(np.sum(sq - 2 * new * sums + n * new * new)))
        moved = np.max(np.abs(new - c))
        c = new
        if moved <= tol * scale:
            break
    c32 = c.astype(np.float32)
    labels = _nearest(v, c32)
    # Report the error of the float32 centroids actually used (never above the last step's).
    err = float(np.sum((v - c32.astype(np.float64)[labels]) ** 2))
    history.append(min(err, history[-1]) if history else err)
    return KMeans1D(c32, labels, history, it)


def _nearest(v: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (ascending (k,)) for each value: a midpoint search."""
    c = centroids.astype(np.float64)
    return np.searchsorted((c[:-1] + c[1:]) / 2, v).astype(np.int64)


# ---- sharing the weights of a model ---------------------------------------------------

@dataclass
class SharedParam:
    """One parameter whose kept entries take values from ``centroids``.

    positions: (m,) int64 flat indices of the kept entries; labels: (m,) int64
    cluster of each; centroids: a Parameter (k,) float32, trained by fine-tuning.
    """

    name: str
    param: Parameter
    centroids: Parameter
    labels: Any
    positions: Any
    bits: int

    def apply(self) -> None:
        """Rewrite the parameter from the centroids (pruned entries stay 0)."""
        if not self.param.data.flags.c_contiguous:  # reshape would copy: writes would be lost
            raise ValueError(f"{self.name}: parameter is not C-contiguous")
        self.param.data.reshape(-1)[self.positions] = self.centroids.data[self.labels]

    def accumulate_grad(self) -> None:
        """Centroid gradient = sum of its members' gradients (np.bincount with weights)."""
        xp = backend.get_array_module(self.param.grad)
        g = self.param.grad.reshape(-1)[self.positions]
        k = self.centroids.size
        self.centroids.grad[...] = xp.bincount(self.labels, weights=g, minlength=k)[:k]


def kept_positions(p: Parameter) -> np.ndarray:
    """Flat indices of the entries that survive pruning: mask 1, or all without a mask."""
    if p.mask is None:
        return np.arange(p.size, dtype=np.int64)
    return np.flatnonzero(backend.to_host(p.mask).reshape(-1) != 0)


def default_bits(name: str, p: Parameter, conv: int = 8, fc: int = 5) -> int | None:
    """The paper's choice: 8 bits for conv kernels (ndim 4), 5 for fc weights, biases not shared."""
    if p.data.ndim >= 4:
        return conv
    if p.data.ndim == 2:
        return fc
    return None


def share_weights(model: Module, bits: dict[str, int] | Callable[[str, Parameter], int | None]
                  | None = None, init: str = "linear", seed: int | None = 0,
                  max_iter: int = 300) -> dict[str, SharedParam]:
    """Cluster each chosen parameter of ``model`` and write the shared values into it.

    bits: ``{param_name: bits}`` (others untouched), or a function of (name, param)
    returning bits or None; default ``default_bits`` (conv 8, fc 5). Returns
    ``{param_name: SharedParam}``; the model's weights are now codebook values.
    """
    choose = bits if callable(bits) else (
        default_bits if bits is None else (lambda n, p: bits.get(n)))  # type: ignore[union-attr]
    params = dict(model.named_parameters())
    if isinstance(bits, dict):
        unknown = sorted(set(bits) - set(params))
        if unknown:
            raise KeyError(f"no parameters named {unknown} (have {sorted(params)})")
    shared: dict[str, SharedParam] = {}
    for name, p in params.items():
        b = choose(name, p)
        if b is None:
            continue
        if not 1 <= int(b) <= 16:
            raise ValueError(f"{name}: bits must be in 1..16, got {b}")
        pos = kept_positions(p)
        values = backend.to_host(p.data).reshape(-1)[pos]
        km = kmeans_1d(values, 2 ** int(b), init=init, seed=seed, max_iter=max_iter)
        xp = backend.get_array_module(p.data)
        cent = Parameter(xp.asarray(km.centroids), name=f"{name}.centroids")
        sp = SharedParam(name, p, cent, xp.asarray(km.labels), xp.asarray(pos), int(b))
        sp.apply()
        shared[name] = sp
    return shared


class CentroidUpdate:
    """The ``update(step)`` for ``distnet.train.fit`` that fine-tunes shared weights.

    After backward: each centroid's gradient is the sum of its members' gradients;
    ``optimizer`` (any distnet optimizer over the centroid Parameters) steps; the
    weights are rewritten from the centroids. ``others`` (optional) updates the
    parameters that are not shared (e.g. biases), as in ordinary training.
    """

    def __init__(self, shared: dict[str, SharedParam], optimizer: Any,
                 others: Any = None, schedule: Callable[[int], float] | None = None) -> None:
        self.shared = shared
        self.optimizer = optimizer
        self.others = others
        self.schedule = schedule

    @classmethod
    def build(cls, model: Module, shared: dict[str, SharedParam], name: str = "adam",
              lr: float = 1e-4, others_lr: float | None = None, **config: Any
              ) -> CentroidUpdate:
        """Centroid optimizer ``name`` (distnet.optim) and, when ``others_lr``, another for
        the unshared parameters."""
        from distnet.optim import build_optimizer

        cents = [(f"{n}.centroids", sp.centroids) for n, sp in shared.items()]
        opt = build_optimizer(name, cents, lr=lr, **config)
        others = None
        if others_lr:
            shared_ids = {id(sp.param) for sp in shared.values()}
            rest = [(n, p) for n, p in model.named_parameters() if id(p) not in shared_ids]
            if rest:
                others = build_optimizer(name, rest, lr=others_lr, **config)
        return cls(shared, opt, others)

    def __call__(self, step: int) -> None:
        for sp in self.shared.values():
            sp.accumulate_grad()
        if self.schedule is not None:
            self.optimizer.lr = self.schedule(step)
        self.optimizer.step()
        for sp in self.shared.values():
            sp.apply()
        if self.others is not None:
            self.others.step()


def codebook_of(shared: Iterable[SharedParam]) -> dict[str, np.ndarray]:
    """Host copies of each shared parameter's codebook (for reports and figures)."""
    return {sp.name: backend.to_host(sp.centroids.data).copy() for sp in shared}
