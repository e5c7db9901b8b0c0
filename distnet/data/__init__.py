"""Datasets, the IDX (MNIST) format and the named data sources of ``load_data``."""

from __future__ import annotations

from distnet.data.dataset import Dataset, stats
from distnet.data.idx import IDXError, read_idx, read_mnist_pair, write_idx
from distnet.data.sources import load_data

__all__ = ["Dataset", "IDXError", "load_data", "read_idx", "read_mnist_pair", "stats",
           "write_idx"]
