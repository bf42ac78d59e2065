#!/usr/bin/env bash
# srun for det/ and seg/ tools: bash elsa_mm/slurm_run.sh TOOL.py PARTITION JOB_NAME [tool arguments]
# As mmdet's slurm scripts: GPUS (8) processes, GPUS_PER_NODE (8) per node, CPUS_PER_TASK (5) CPUs each,
# SRUN_ARGS added to srun's arguments.
set -euo pipefail
TOOL=$1
PARTITION=$2
JOB_NAME=$3
shift 3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}
set -x
# SRUN_ARGS is split into words on purpose.
# shellcheck disable=SC2086
exec srun -p "$PARTITION" \
  --job-name="$JOB_NAME" \
  --gres=gpu:"$GPUS_PER_NODE" \
  --ntasks="$GPUS" \
  --ntasks-per-node="$GPUS_PER_NODE" \
  --cpus-per-task="$CPUS_PER_TASK" \
  --kill-on-bad-exit=1 \
  $SRUN_ARGS \
  "$PYTHON" -u "$TOOL" "$@" --launcher slurm
