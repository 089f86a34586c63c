#!/usr/bin/env bash
# What dist_train.sh and dist_test.sh share: run SCRIPT on NUM_PROCS processes
# per node with torchrun (--launcher pytorch is appended to its arguments).
#   bash tools/torchrun.sh NUM_PROCS SCRIPT [args...]
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (29500),
# PYTHON (python).
set -euo pipefail
PROCS=$1
SCRIPT=$2
shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
exec "${PYTHON:-python}" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" \
    --nproc_per_node="$PROCS" \
    "$SCRIPT" "$@" --launcher pytorch
