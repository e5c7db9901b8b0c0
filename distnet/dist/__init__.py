"""Distributed jobs: roles on MPI ranks, the worker loop, allreduce, and the launcher.

``run_job(config)`` (``job.py``) is what ``distnet train --mode sync|async|ssp|allreduce``
calls. Outside MPI it re-launches itself with ``mpiexec`` (``launcher.py``); under
MPI the first ``servers`` ranks host parameter-server shards (``server_role.py``)
and the others train (``worker.py``), or, in ``allreduce`` mode, every rank trains
and averages gradients with ``MPI.Allreduce`` (``allreduce.py``).
"""

from __future__ import annotations

__all__ = ["run_job"]


def run_job(config: dict) -> dict | None:
    """See ``distnet.dist.job.run_job`` (imported lazily: importing MPI starts MPI)."""
    from distnet.dist.job import run_job as _run_job

    return _run_job(config)
