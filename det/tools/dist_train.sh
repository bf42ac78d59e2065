#!/usr/bin/env bash
# Distributed training: tools/dist_train.sh CONFIG GPUS [tools/train.py arguments]
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR and PORT.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=$1
GPUS=$2
shift 2
exec bash "$HERE/../../elsa_mm/dist_run.sh" "$HERE/train.py" "$GPUS" "$CONFIG" "$@"
