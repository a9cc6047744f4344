#!/usr/bin/env bash
# Multi-GPU training: bash tools/dist_train.sh CONFIG NUM_GPUS [train.py options...]
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT environment variables (torchrun).
# Python: $PYTHON if set, else the repository's .venv/bin/python if it exists (make setup), else `python`.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "error: usage: bash tools/dist_train.sh CONFIG NUM_GPUS [train.py options...]" >&2
    exit 2
fi
CONFIG=$1
GPUS=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON=python
    fi
fi
PYTHONPATH="$ROOT:${PYTHONPATH:-}" exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" --master_port="$PORT" \
    "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
