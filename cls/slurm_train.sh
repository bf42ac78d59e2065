#!/usr/bin/env bash
# Training on a SLURM cluster with srun, one task per GPU (the arguments of mmdet's tools/slurm_train.sh):
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS="..."] \
#     bash slurm_train.sh PARTITION JOB_NAME DATA_DIR [train.py arguments]
# Each task reads its rank from SLURM_PROCID and meets the others on the job's first node (MASTER_PORT,
# default 29500). When SLURM sends SIGTERM or SIGUSR1 (preemption, time limit), train.py finishes its
# step, saves last.pth.tar and exits with code 75; the same command with --experiment NAME --resume auto
# continues from there (SRUN_ARGS="--signal=USR1@120" asks for the signal 2 minutes before the time limit;
# a batch script can requeue itself on code 75, see docs/cls.md).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] bash slurm_train.sh PARTITION JOB_NAME DATA_DIR [train.py arguments]" >&2
  exit 2
fi
PARTITION=$1
JOB_NAME=$2
shift 2
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$((GPUS < 8 ? GPUS : 8))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-}
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-$([ -x "$HERE/../.venv/bin/python" ] && echo "$HERE/../.venv/bin/python" || echo python3)}
# shellcheck disable=SC2086  # SRUN_ARGS holds several options
exec srun -p "$PARTITION" \
  --job-name="$JOB_NAME" \
  --gres=gpu:"$GPUS_PER_NODE" \
  --ntasks="$GPUS" \
  --ntasks-per-node="$GPUS_PER_NODE" \
  --cpus-per-task="$CPUS_PER_TASK" \
  --kill-on-bad-exit=1 \
  $SRUN_ARGS \
  "$PYTHON" -u "$HERE/train.py" "$@"
