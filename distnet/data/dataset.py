"""An in-memory labelled dataset: slicing, sharding across workers and batching."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class Dataset:
    """Examples ``x`` (N, ...) float32 with labels ``y`` (N,) int64, held on the host.

    ``ds[i]`` is one example ``(x_i, y_i)``; ``ds[slice]`` and ``ds[index_array]``
    are Datasets (a slice is a view, an index array a copy).
    """

    def __init__(self, x: Any, y: Any, name: str = "") -> None:
        x = np.asarray(x, dtype=np.float32)
        y = np.asarray(y)
        if y.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        y = y.astype(np.int64, copy=False)
        if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"x {x.shape} and y {y.shape} must hold the same number N of "
                             "examples: x (N, ...), y (N,)")
        self.x, self.y, self.name = x, y, name

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            return self.x[index], self.y[index]
        return Dataset(self.x[index], self.y[index], self.name)

    def __repr__(self) -> str:
        name = f"{self.name!r}, " if self.name else ""
        return f"Dataset({name}{len(self)} examples, x {self.x.shape[1:]})"

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self) else 0

    def shard(self, rank: int, world: int) -> Dataset:
        """Part ``rank`` of ``world``: examples ``rank, rank + world, ...`` (a contiguous copy).

        Strided shards are disjoint, cover the dataset, differ in size by at most one,
        and each sees every part of the data's order (so a file sorted by class
        still gives every worker every class). Deterministic: no randomness.
        """
        if isinstance(world, bool) or not isinstance(world, (int, np.integer)) or world < 1:
            raise ValueError(f"world size must be a positive integer, got {world!r}")
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
                or not 0 <= rank < world:
            raise ValueError(f"rank must be an integer in [0, {world}), got {rank!r}")
        if world > len(self):
            raise ValueError(f"cannot split {len(self)} examples into {world} non-empty shards")
        name = f"{self.name}[{rank}/{world}]" if self.name else ""
        return Dataset(np.ascontiguousarray(self.x[rank::world]), self.y[rank::world].copy(),
                       name)

    def batches(self, batch_size: int, shuffle: bool = True, seed: int = 0,
                drop_last: bool = False, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(xb (B, ...) float32, yb (B,) int64)`` covering the epoch once.

        The order is a permutation seeded by ``(seed, epoch)``, so a resumed run sees
        the same batches. Shuffled batches are gathered into two buffers that are
        reused: an array yielded is valid until the next one is requested (copy it to
        keep it), which saves a fresh allocation per batch. Without shuffling the
        batches are views of the data.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        stop = n - n % batch_size if drop_last else n
        if not shuffle:
            for start in range(0, stop, batch_size):
                yield self.x[start : start + batch_size], self.y[start : start + batch_size]
            return
        order = np.random.default_rng([seed, epoch]).permutation(n)
        xbuf = np.empty((min(batch_size, n),) + self.x.shape[1:], dtype=self.x.dtype)
        ybuf = np.empty(min(batch_size, n), dtype=self.y.dtype)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            k = len(idx)
            # mode="clip" lets np.take write straight into out (mode="raise" buffers it);
            # the indices come from a permutation, so they are always in range.
            np.take(self.x, idx, axis=0, out=xbuf[:k], mode="clip")
            np.take(self.y, idx, axis=0, out=ybuf[:k], mode="clip")
            yield xbuf[:k], ybuf[:k]

    def stats(self) -> tuple[float, float]:
        """``stats(self.x)``: the scalar mean and std of the inputs."""
        return stats(self.x)


def stats(x: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation over every value of ``x``, as Python floats.

    Computed in float64 (float32 sums drift on millions of pixels); a constant
    input gives std 1.0 so ``Normalize(mean, std)`` never divides by zero.
    """
    x = np.asarray(x)
    if x.size == 0:
        raise ValueError("cannot compute statistics of an empty array")
    mean = float(x.mean(dtype=np.float64))
    std = float(x.std(dtype=np.float64))
    return mean, (std if std > 0 else 1.0)
