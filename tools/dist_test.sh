#!/usr/bin/env bash
# Distributed testing with torchrun, as in MMDetection:
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py args...]
# NUM_PROCS is the number of GPUs per node, or of CPU processes without CUDA
# (then tools/test.py uses gloo; no config change is needed).
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (29500),
# PYTHON (python).
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: bash $0 CONFIG CHECKPOINT NUM_PROCS [test.py args...]" >&2
    exit 2
fi
TOOLS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PROCS=$3
set -- "$1" "$2" "${@:4}"
exec bash "$TOOLS/torchrun.sh" "$PROCS" "$TOOLS/test.py" "$@"
