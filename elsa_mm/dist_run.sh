#!/usr/bin/env bash
# torchrun for det/ and seg/ tools: bash elsa_mm/dist_run.sh TOOL.py GPUS [tool arguments]
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR (or ADDR) and PORT (or MASTER_PORT), as mmdet's scripts.
set -euo pipefail
TOOL=$1
GPUS=$2
shift 2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-${ADDR:-127.0.0.1}}" --master_port="${PORT:-${MASTER_PORT:-29500}}" \
  --nproc_per_node="$GPUS" "$TOOL" "$@" --launcher pytorch
