#!/usr/bin/env bash
# Training on a SLURM cluster: tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py arguments]
# GPUS (8), GPUS_PER_NODE (8), CPUS_PER_TASK (5) and SRUN_ARGS as mmdet's script.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [tools/train.py arguments]" >&2
  exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
shift 4
exec bash "$HERE/../../elsa_mm/slurm_run.sh" "$HERE/train.py" "$PARTITION" "$JOB_NAME" "$CONFIG" --work-dir "$WORK_DIR" "$@"
