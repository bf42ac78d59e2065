#!/usr/bin/env bash
# Distributed testing: tools/dist_test.sh CONFIG CHECKPOINT GPUS [tools/test.py arguments]
# Several nodes: NNODES, NODE_RANK, MASTER_ADDR and PORT.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
exec bash "$HERE/../../elsa_mm/dist_run.sh" "$HERE/test.py" "$GPUS" "$CONFIG" "$CHECKPOINT" "$@"
