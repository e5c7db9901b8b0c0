#!/usr/bin/env bash
# Run `distnet train` on N MPI ranks of this machine (the first ranks host the
# parameter-server shards, the rest are workers).
#
#   launch/local.sh -n 4 --mode sync --workers 3 --data digits --out sync.npz
#   launch/local.sh --mode allreduce --workers 2 --epochs 2      # -n from --workers/--servers
#   launch/local.sh --dry-run -n 3 --mode async                  # print the mpiexec command
#
# A thin wrapper over the launcher library (python -m distnet.dist.launcher):
# it finds mpiexec next to the venv's Python and passes the environment through.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"
exec "$python" -m distnet.dist.launcher "$@"
