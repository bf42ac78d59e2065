#!/usr/bin/env bash
# Distributed training with torchrun and DDP (NCCL on GPUs, gloo on CPU):
#   bash distributed_train.sh NUM_PROC DATA_DIR [train.py arguments]
# Several nodes: run it on each with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT set, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash distributed_train.sh 8 /data/imagenet --model elsa_swin_base -b 64 ...
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash distributed_train.sh NUM_PROC DATA_DIR [train.py arguments]" >&2
  exit 2
fi
NUM_PROC=$1
shift
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-$([ -x "$HERE/../.venv/bin/python" ] && echo "$HERE/../.venv/bin/python" || echo python3)}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  --nproc_per_node="$NUM_PROC" "$HERE/train.py" "$@"
