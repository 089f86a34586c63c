#!/usr/bin/env bash
# Distributed training with torchrun, as in MMDetection:
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args...]
# NUM_PROCS is the number of GPUs per node, or of CPU processes without CUDA
# (then tools/train.py uses gloo; no config change is needed).
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (29500),
# PYTHON (python).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash $0 CONFIG NUM_PROCS [train.py args...]" >&2
    exit 2
fi
TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROCS=$2
set -- "$1" "${@:3}"
exec bash "$TOOLS/torchrun.sh" "$PROCS" "$TOOLS/train.py" "$@"
