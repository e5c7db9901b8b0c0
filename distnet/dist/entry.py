"""The program every rank of a launched job runs.

    mpiexec -n RANKS python -m mpi4py -m distnet.dist.entry <run_dir>/job.json

``job.json`` holds the resolved settings (written by ``distnet.dist.job.launch_job``).
The chief worker writes its result to ``<run_dir>/result.json``, which the launching
process reads back. A failing rank prints one line naming itself and the error
(the traceback too when ``distnet --debug`` started the job) and aborts the whole
job; ``python -m mpi4py`` does the same for anything that escapes this module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mpi4py -m distnet.dist.entry JOB.json", file=sys.stderr)
        return 2
    config = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    from mpi4py import MPI

    from distnet.dist.job import run_ranks

    try:
        run_ranks(config, MPI.COMM_WORLD)
    except Exception:
        if config.get("_debug"):
            raise  # the traceback, then mpi4py's abort
        # run_ranks printed the one-line reason; end every rank now, without a traceback
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
