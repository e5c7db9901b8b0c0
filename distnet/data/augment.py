"""Data augmentation for image batches (applied on the host, per batch)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def random_shift(x: np.ndarray, rng: np.random.Generator, max_shift: int = 2) -> np.ndarray:
    """Translate each image by up to ``max_shift`` pixels in each direction, filling with 0.

    x: (N, C, H, W) float32. Returns a new (N, C, H, W) array. Small shifts are the
    cheapest augmentation that helps on MNIST, where a few thousand examples would
    otherwise be memorised.
    """
    if x.ndim != 4:
        raise ValueError(f"random_shift expects (N, C, H, W) images, got shape {x.shape}")
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    s = max_shift
    padded = np.pad(x, ((0, 0), (0, 0), (s, s), (s, s)))
    windows = sliding_window_view(padded, (h, w), axis=(2, 3))  # (N, C, 2s+1, 2s+1, H, W)
    dy = rng.integers(0, 2 * s + 1, size=n)
    dx = rng.integers(0, 2 * s + 1, size=n)
    return np.ascontiguousarray(windows[np.arange(n), :, dy, dx])


AUGMENTATIONS = {"none": None, "shift": random_shift}


def get_augmentation(name: str | None):
    """The augmentation function called ``name`` (``none`` or ``shift``)."""
    key = (name or "none").lower()
    if key not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}: expected one of {sorted(AUGMENTATIONS)}")
    return AUGMENTATIONS[key]
