"""Running real distnet processes from tests: own process group, always cleaned up."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from distnet.dist import launcher

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], timeout: float = 120, env: dict | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group from the repository root; the group is killed
    afterwards in any case (no rank outlives the test)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=full_env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}")
    finally:
        launcher.kill_group(proc)
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)}\n{err[-3000:]}")
    return result
