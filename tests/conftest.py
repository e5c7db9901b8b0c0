"""Shared fixtures: the MNIST data beside the checkout, GPU and MPI availability."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for `import gradcheck`

# Runs made by tests go to a temporary folder, not ./runs of the checkout.
os.environ.setdefault("DISTNET_RUNS", tempfile.mkdtemp(prefix="distnet-test-runs-"))

MNIST_DIR = Path(os.environ.get("DISTNET_MNIST", ROOT.parent / "shared" / "data" / "mnist"))


def mpiexec_path() -> str | None:
    """mpiexec next to this Python (the mpich wheel installs it there), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    if not (MNIST_DIR / "mnist8k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST data not found in {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="session")
def mpiexec() -> str:
    path = mpiexec_path()
    if path is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    return path


def pytest_collection_modifyitems(config, items):
    from distnet import backend

    if not any("gpu" in item.keywords for item in items):
        return
    if not backend.cuda_available():
        skip = pytest.mark.skip(reason="no CUDA GPU with CuPy on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
