"""In-place level-1 BLAS (``axpy``, ``scal``) for the optimizers' updates.

Why: ``p += -lr * v`` in NumPy is two passes over memory and a scratch array;
BLAS ``axpy`` is one pass, in place. For a 4M-float momentum step
(``benchmarks/bench_ps_throughput.py``'s server) that is 2.0 ms on one thread
against 3.2 ms for the NumPy expressions, and the step is what a parameter server
spends its time on between receiving a gradient and replying.

The BLAS path is taken for NumPy float32/float64 arrays that are C-contiguous and
of one dtype (SciPy's f2py wrappers then work on the arrays themselves, never a
copy); anything else (CuPy, float16, strided views) uses the ``xp`` expression.
SciPy is imported on first use: it costs ~0.15 s that a process which never
updates large arrays should not pay.

SciPy's wheels bring their own OpenBLAS (in ``scipy.libs``), separate from NumPy's:
two thread pools whose idle threads spin on the same cores. With both at 2 threads a
lenet300 training step took 8.0 ms instead of 1.3 ms (NumPy's matmuls waited for
SciPy's spinning pool). SciPy's private copy is therefore limited to one thread, the
caller's: level-1 BLAS is bound by memory, not cores. A SciPy that shares NumPy's
BLAS (conda, system builds) is left alone.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from distnet import backend

_KINDS = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


@cache
def _scipy_blas() -> Any:
    import scipy  # noqa: PLC0415 - see the module docstring
    from scipy.linalg import blas  # noqa: PLC0415
    from threadpoolctl import ThreadpoolController  # noqa: PLC0415

    private = Path(scipy.__file__).resolve().parent.parent / "scipy.libs"
    for lib in ThreadpoolController().lib_controllers:
        if Path(lib.filepath).resolve().parent == private:
            lib.set_num_threads(1)
    return blas


def _routine(name: str) -> Any:
    return getattr(_scipy_blas(), name)


def _blas_ok(*arrays: Any) -> bool:
    first = arrays[0]
    return (type(first) is np.ndarray and first.dtype in _KINDS and all(
        type(a) is np.ndarray and a.dtype == first.dtype and a.shape == first.shape
        and a.flags.c_contiguous for a in arrays))


def axpy(a: float, x: Any, y: Any, scratch: Any = None) -> None:
    """``y += a * x`` in place (``y`` must be writeable). ``scratch``, shaped like ``y``,
    holds ``a * x`` where BLAS cannot be used (no temporary is allocated then)."""
    if _blas_ok(y, x) and y.size:
        _routine(_KINDS[y.dtype] + "axpy")(x.reshape(-1), y.reshape(-1), a=a)
    else:
        y += backend.get_array_module(y).multiply(x, a, out=scratch)


def scal(a: float, x: Any) -> None:
    """``x *= a`` in place."""
    if _blas_ok(x) and x.size:
        _routine(_KINDS[x.dtype] + "scal")(a, x.reshape(-1))
    else:
        x *= a


def limit_threads(n: int) -> None:
    """Limit every BLAS library in this process (NumPy's and SciPy's) to ``n`` threads.

    For a process that only serves parameters: its BLAS work is level 1, bound by
    memory, and idle BLAS threads spinning on the cores slow ZeroMQ's I/O threads.
    """
    from threadpoolctl import threadpool_limits  # noqa: PLC0415

    _scipy_blas()  # loaded first, so that its copy is limited too
    threadpool_limits(n, user_api="blas")


def load() -> None:
    """Load SciPy's BLAS now (~0.15 s), e.g. before a server's first round, which would
    otherwise pay for it while every worker waits."""
    _scipy_blas()
