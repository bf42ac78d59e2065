#!/usr/bin/env bash
# Testing on a SLURM cluster: tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py arguments]
# GPUS (8), GPUS_PER_NODE (8), CPUS_PER_TASK (5) and SRUN_ARGS as mmdet's script.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [tools/test.py arguments]" >&2
  exit 2
fi
HERE=$(cd "$(dirname "$0")" && pwd)
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
shift 4
exec bash "$HERE/../../elsa_mm/slurm_run.sh" "$HERE/test.py" "$PARTITION" "$JOB_NAME" "$CONFIG" "$CHECKPOINT" "$@"
