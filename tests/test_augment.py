import numpy as np
import pytest

from distnet.data.augment import get_augmentation, random_shift


def test_random_shift_moves_pixels_within_bound():
    x = np.zeros((64, 1, 8, 8), dtype=np.float32)
    x[:, 0, 4, 4] = 1.0
    out = random_shift(x, np.random.default_rng(0), max_shift=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    ys, xs = np.nonzero(out[:, 0])[1:]
    assert np.all(np.abs(ys - 4) <= 2) and np.all(np.abs(xs - 4) <= 2)
    assert len(set(zip(ys, xs, strict=True))) > 5  # shifts differ between images
    assert out.sum() == 64  # nothing lost at this distance from the border


def test_unknown_augmentation():
    assert get_augmentation(None) is None
    with pytest.raises(ValueError, match="unknown augmentation 'flip'"):
        get_augmentation("flip")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        random_shift(np.zeros((3, 4), np.float32), np.random.default_rng(0))
