#!/usr/bin/env bash
# Run `distnet train` across the hosts of an mpirun hostfile (`host slots=N` lines).
#
#   launch/cluster.sh --hostfile cluster/hosts --mode ssp --staleness 2 --workers 3
#   launch/cluster.sh --hostfile cluster/hosts -n 4 --config cluster/jobs/two-servers.toml
#
# Needs: the same checkout path and venv on every host (a shared file system),
# password-less ssh between the hosts (MPICH hydra and Open MPI start the remote
# ranks over ssh), and addresses the hosts can reach each other on. Set
# DISTNET_HOST per host when a server should advertise a particular address.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"
[[ -x "$python" ]] || python="$(command -v python3)"
hostfile=""
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile) hostfile="${2:?--hostfile needs a file}"; shift 2 ;;
        --hostfile=*) hostfile="${1#*=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
if [[ -z "$hostfile" ]]; then
    echo "usage: launch/cluster.sh --hostfile FILE [distnet train args...]" >&2
    exit 2
fi
[[ -f "$hostfile" ]] || { echo "launch/cluster.sh: hostfile not found: $hostfile" >&2; exit 2; }
exec "$python" -m distnet.dist.launcher --hostfile "$hostfile" "${args[@]}"
