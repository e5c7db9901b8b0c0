"""Named data sources: ``digits``, ``mnist:DIR`` and ``synthetic[:N]``.

``load_data(spec)`` returns ``(train, val, info)``: two Datasets of images
``(N, C, H, W)`` float32 in [0, 1] with int64 labels, and a JSON-able ``info``
dict (``name``, ``input_shape``, ``num_classes``, ``train_size``, ``val_size``,
``source``) that checkpoints keep, so a model can be rebuilt for its data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distnet.data.dataset import Dataset
from distnet.data.idx import read_mnist_pair

SPECS = "digits, mnist:DIR (or mnist:FILE of an images/labels pair), synthetic[:N]"
MNIST_VAL_SIZE = 1000  # the convention for a single pair: its last 1,000 examples validate
_IMAGES, _LABELS = "-images-idx3-ubyte", "-labels-idx1-ubyte"


def load_data(spec: str, val_size: int | None = None, seed: int = 0,
              synthetic_size: int = 2000, synthetic_shape: tuple[int, ...] = (1, 8, 8),
              num_classes: int = 10) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """The train and validation Datasets named by ``spec``, and their ``info``.

    val_size: examples held out; None takes the source's default: 20% for
    ``digits`` (a seeded shuffle, then the last 20%) and ``synthetic``, 1000 for an
    MNIST pair (its last examples, unshuffled). ``mnist:DIR`` with the standard
    ``train-*``/``t10k-*`` files uses t10k as validation and ignores val_size.
    synthetic_size/shape/num_classes: the ``synthetic`` data when N is not in the spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty data spec: expected one of {SPECS}")
    name, _, arg = spec.strip().partition(":")
    name = name.lower()
    if name == "digits" and not arg:
        return _digits(val_size, seed)
    if name == "mnist":
        if not arg:
            raise ValueError("the mnist data needs a directory: mnist:DIR")
        return _mnist(arg, val_size)
    if name == "synthetic":
        n = synthetic_size
        if arg:
            try:
                n = int(arg)
            except ValueError:
                raise ValueError(f"synthetic:N needs an integer N, got {arg!r}") from None
        return _synthetic(n, tuple(synthetic_shape), num_classes, val_size, seed)
    raise ValueError(f"unknown data spec {spec!r}: expected one of {SPECS}")


def _split(x: np.ndarray, y: np.ndarray, val_size: int, name: str, source: str,
           num_classes: int) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """The last ``val_size`` examples validate, the rest train."""
    n = len(y)
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}) for {name} ({n} examples), "
                         f"got {val_size}")
    cut = n - val_size
    train = Dataset(x[:cut], y[:cut], f"{name}/train")
    val = Dataset(x[cut:], y[cut:], f"{name}/val")
    return train, val, _info(name, source, train, val, num_classes)


def _info(name: str, source: str, train: Dataset, val: Dataset,
          num_classes: int) -> dict[str, Any]:
    # a list, not a tuple, so the info compares equal after a JSON round trip (checkpoints)
    return {"name": name, "input_shape": [int(d) for d in train.x.shape[1:]],
            "num_classes": int(num_classes), "train_size": len(train), "val_size": len(val),
            "source": source}


def _digits(val_size: int | None, seed: int) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """scikit-learn's 1,797 8x8 digits (bundled, no download), pixels 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    val_size = len(y) // 5 if val_size is None else int(val_size)
    return _split(x[order], y[order], val_size, "digits", "sklearn.datasets.load_digits", 10)


def _synthetic(n: int, shape: tuple[int, ...], num_classes: int, val_size: int | None,
               seed: int) -> tuple[Dataset, Dataset, dict[str, Any]]:
    """Gaussian clusters (std 0.35, clipped to [0, 1]) around ``num_classes`` random centres
    in [0, 1]^D: a linear model separates them almost perfectly, so smoke tests of
    training can expect high accuracy within a few epochs."""
    if n < 2 or num_classes < 2 or not shape or min(shape) < 1:
        raise ValueError(f"synthetic data needs N >= 2, >= 2 classes and a valid shape, got "
                         f"N={n}, classes={num_classes}, shape={shape}")
    rng = np.random.default_rng(seed)
    dim = int(np.prod(shape))
    centres = rng.uniform(0.0, 1.0, size=(num_classes, dim))
    y = rng.permutation(np.arange(n) % num_classes).astype(np.int64)  # balanced classes
    x = centres[y] + rng.normal(0.0, 0.35, size=(n, dim))
    x = np.clip(x, 0.0, 1.0).astype(np.float32).reshape((n,) + shape)
    val_size = n // 5 if val_size is None else int(val_size)
    return _split(x, y, val_size, "synthetic", f"synthetic:{n} seed={seed}", num_classes)


def _mnist(arg: str, val_size: int | None) -> tuple[Dataset, Dataset, dict[str, Any]]:
    path = Path(arg).expanduser()
    if path.is_file():
        images, labels = _pair_of(path)
        val_pair = None
    elif path.is_dir():
        (images, labels), val_pair = _find_mnist(path)
    else:
        raise FileNotFoundError(f"MNIST data not found: {path} is neither a directory nor a "
                                "file")
    x, y = read_mnist_pair(images, labels)
    if val_pair is None:
        val_size = MNIST_VAL_SIZE if val_size is None else int(val_size)
        return _split(x, y, val_size, "mnist", str(images), 10)
    xv, yv = read_mnist_pair(*val_pair)
    train, val = Dataset(x, y, "mnist/train"), Dataset(xv, yv, "mnist/val")
    return train, val, _info("mnist", f"{images} + {val_pair[0]}", train, val, 10)


def _existing(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _find_mnist(directory: Path) -> tuple[tuple[Path, Path], tuple[Path, Path] | None]:
    """The standard train (and t10k) pairs, else the single ``*-images-idx3-ubyte[.gz]`` pair."""
    pairs = {}
    for prefix in ("train", "t10k"):
        img, lab = (_existing(directory, prefix + s) for s in (_IMAGES, _LABELS))
        if (img is None) != (lab is None):
            missing = prefix + (_LABELS if lab is None else _IMAGES)
            raise FileNotFoundError(f"{directory}: found {(img or lab).name} but not "
                                    f"{missing}[.gz]")
        if img is not None:
            pairs[prefix] = (img, lab)
    if "train" in pairs:
        return pairs["train"], pairs.get("t10k")
    found = sorted(p for p in directory.iterdir() if p.is_file()
                   and p.name.removesuffix(".gz").endswith(_IMAGES))
    if not found:
        raise FileNotFoundError(f"no MNIST files in {directory}: looked for "
                                f"train{_IMAGES}[.gz] and train{_LABELS}[.gz], or one "
                                f"*{_IMAGES}[.gz] file with its *{_LABELS}[.gz]")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{directory} holds several image files ({names}): name one with "
                         "mnist:FILE")
    return _pair_of(found[0]), None


def _pair_of(path: Path) -> tuple[Path, Path]:
    """(images, labels) for a path to either file of a pair: the other has the same prefix."""
    stem = path.name.removesuffix(".gz")
    if stem.endswith(_IMAGES):
        prefix, images = stem[: -len(_IMAGES)], True
    elif stem.endswith(_LABELS):
        prefix, images = stem[: -len(_LABELS)], False
    else:
        raise ValueError(f"{path}: not an MNIST file name (expected *{_IMAGES}[.gz] or "
                         f"*{_LABELS}[.gz])")
    other = _existing(path.parent, prefix + (_LABELS if images else _IMAGES))
    if other is None:
        want = prefix + (_LABELS if images else _IMAGES)
        raise FileNotFoundError(f"{path}: its partner {want}[.gz] is not in {path.parent}")
    return (path, other) if images else (other, path)
