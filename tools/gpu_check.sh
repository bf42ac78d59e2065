#!/usr/bin/env bash
# Checks elsa_op on a GPU machine in one command, from the repository root:
#
#     bash tools/gpu_check.sh            # logs under $OUT (default ./gpu_check_out)
#
# For a machine whose python3 already has torch (CUDA build, at least the version pyproject.toml asks
# for), timm, pytest, ninja and nvcc: it installs nothing, needs no network and no virtual environment,
# and imports the packages from the working tree (PYTHONPATH is the repository root; every script runs by
# its path). Each step has a timeout, so that the whole stays under BUDGET seconds (default 470: under 8
# minutes on one H100), most important first:
#    1. build elsa_op._C in place for this GPU's architecture only (ptxas register and spill report)
#    2. the GPU tests (pytest -m cuda; what CI runs without a GPU, such as the CPU emulation, is left out)
#    3. compute-sanitizer memcheck of elsa_op's kernels over tools/gpu_sanitizer_cases.py
#    4. benchmarks/bench_op.py at batch 128, each kernel timed alone, next to the whole-kernel estimate
#       that benchmarks/sass_budget.py makes from the compiled code for this GPU (budget.log: each measured
#       time beside the estimate, its binding bound and measured / estimate)
#    5. cls/distributed_train.sh 1 on a small generated folder
#    6. det/tools/dist_train.sh and seg/tools/dist_train.sh with 1 GPU for a few iterations of a small
#       config, then their tools/dist_test.sh (needs mmengine, mmcv, mmdet / mmseg: skipped, with the
#       reason, where the python lacks them)
#    7. benchmarks/bench_op.py against the unfold path at batch 8, and benchmarks/bench_models.py
# A step that does not finish in time is stopped with SIGINT (pytest then prints its summary), then
# killed. $OUT ends with at most 8 plain files: summary.txt (what passed, failed, was skipped and why, and
# each step's time) and one log per group of steps. Exit status: 0 when every step that ran passed and a
# GPU was found, else 1.
#
# Options, as environment variables: PYTHON (default python3), BUDGET, and STEP_CAP (the most seconds any one
# step may take, default 600).
set -u
cd "$(dirname "$0")/.." || exit 2
[ -f setup.py ] && [ -d elsa_op ] || { echo "run from the repository" >&2; exit 2; }
REPO=$PWD

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-470}
STEP_CAP=${STEP_CAP:-600}
PY=${PYTHON:-python3}
T0=$SECONDS
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
for f in env build tests sanitizer bench budget dist; do : > "$OUT/$f.log"; done
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export MAX_JOBS=${MAX_JOBS:-16}
export FORCE_CUDA=1
# Work directories of the training runs: outside $OUT, which keeps only the logs.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
FAILED=0

left() { echo $(( BUDGET - (SECONDS - T0) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME CAP LOG CMD...: CMD with a timeout of min(CAP, STEP_CAP, time left - 10 s), output appended to
# LOG between a header and an `rc=` line. On time-out: SIGINT, then SIGKILL 15 s later. Returns CMD's
# status (124 for a time-out, 99 when there was no time left to start it).
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local l t s rc verdict
  l=$(left)
  if [ "$l" -lt 15 ]; then note "$name: SKIPPED (${l}s of the budget left)"; return 99; fi
  t=$(( cap < l - 10 ? cap : l - 10 )); t=$(( t < STEP_CAP ? t : STEP_CAP ))
  echo "===== $name (timeout ${t}s): $*" >> "$log"
  s=$SECONDS
  timeout --signal=INT --kill-after=15 "$t" "$@" >> "$log" 2>&1
  rc=$?
  echo "----- $name: rc=$rc after $((SECONDS - s))s" >> "$log"
  verdict=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMED OUT after ${t}s"; elif [ $rc -ne 0 ]; then verdict=FAILED; fi
  [ $rc -ne 0 ] && FAILED=1
  note "$name: $verdict (rc=$rc, $((SECONDS - s))s, $(basename "$log"))"
  return $rc
}
skip() { note "$1: SKIPPED ($2)"; }

# 0. the machine and its tools, each query bounded
step env 60 "$OUT/env.log" env GPU_CHECK_PY="$PY" bash -c '
  date; echo "python: $(command -v "$GPU_CHECK_PY") ($("$GPU_CHECK_PY" --version 2>&1))"
  for tool in nvidia-smi nvcc ninja compute-sanitizer c++filt cuobjdump; do
    echo "$tool: $(command -v $tool || echo "not found")"
  done
  command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v ninja >/dev/null && echo "ninja $(ninja --version)"
  command -v compute-sanitizer >/dev/null && compute-sanitizer --version | tail -1
  "$GPU_CHECK_PY" -c "import torch, timm, pytest; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"timm\", timm.__version__, \"pytest\", pytest.__version__)"
'
# The torch pyproject.toml asks for, stated once there.
TORCH_MIN=$(timeout 30 "$PY" -c "
import re, tomllib
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']
print(next(re.search(r'>=\s*([\d.]+)', d).group(1) for d in deps if re.match(r'torch\b', d)))" 2>>"$OUT/env.log")
# The torch version against it, then this GPU's architecture and name (no answer in time: no usable GPU).
QUERY=$(timeout 60 "$PY" -c "
import sys, torch
have = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2])
want = tuple(int(p) for p in sys.argv[1].split('.')[:2])
print('yes' if have >= want else 'no, torch ' + torch.__version__)
assert torch.cuda.is_available(), 'torch sees no CUDA device'
print('%d.%d' % torch.cuda.get_device_capability(0), torch.cuda.get_device_name(0))" "${TORCH_MIN:-0}" 2>>"$OUT/env.log")
TORCH_OK=$(echo "$QUERY" | sed -n 1p)
DEVICE=$(echo "$QUERY" | sed -n 2p)
ARCH=${DEVICE%% *}
GPU=${DEVICE#* }
note "torch: ${TORCH_OK:-not importable} (pyproject.toml asks for >= ${TORCH_MIN:-?})"
note "device: ${GPU:-no CUDA device} (arch ${ARCH:-?})"
if [ -z "$GPU" ] || [ -z "$ARCH" ]; then
  for s in build tests memcheck bench_op cls_dist det_dist seg_dist bench_op_unfold bench_models; do
    skip "$s" "no CUDA device"
  done
  # What needs no GPU still runs: the estimates from the library built in the tree, if it has CUDA code.
  step estimates 90 "$OUT/budget.log" "$PY" benchmarks/sass_budget.py --device H100
  note "total: $((SECONDS - T0))s of ${BUDGET}s"
  echo; cat "$SUMMARY"
  exit 1
fi

# 1. build for this GPU only (each extra architecture costs about a minute of nvcc); an incremental
# rebuild on a rerun. The architecture comes from the GPU, never from the environment.
export TORCH_CUDA_ARCH_LIST=$ARCH
SM=sm_${ARCH/./}
# nvcc reads this: every kernel's registers and spills go to build.log.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas -v"
step build 300 "$OUT/build.log" "$PY" setup.py build_ext --inplace
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [ $rc -ne 99 ]; then
  # A toolkit-only nvcc may lack the CUDA library headers torch includes; torch's nvidia-* wheels ship
  # them. (A build that ran out of time is not retried: it would only run out of time again.)
  NVINC=$(timeout 30 "$PY" -c "import pathlib, torch; r = pathlib.Path(torch.__file__).resolve().parent.parent; print(':'.join(str(p) for p in sorted(r.glob('nvidia/*/include')) + sorted(r.glob('nvidia/*/*/include'))))")
  if [ -n "$NVINC" ]; then
    export CPATH=$NVINC${CPATH:+:$CPATH}
    note "build: retrying with the nvidia-* wheels' headers on CPATH"
    step build-retry 240 "$OUT/build.log" "$PY" setup.py build_ext --inplace
    rc=$?
  fi
fi
if [ $rc -eq 0 ] && grep -q "ptxas info" "$OUT/build.log"; then
  grep -E "bytes spill stores" "$OUT/build.log" | grep -vq " 0 bytes spill stores" \
    && note "ptxas: SPILLS (see build.log)" || note "ptxas: no kernel spills"
elif [ $rc -eq 0 ]; then
  note "ptxas: nothing was compiled (the library was up to date), so no register report"
fi
step smoke 90 "$OUT/build.log" "$PY" -c "
import torch, elsa_op
assert torch._C._dispatch_has_kernel_for_dispatch_key('elsa_op::elsa_forward', 'CUDA'), 'no CUDA kernels'
x, h = torch.randn(1, 8, 5, 5, device='cuda'), torch.randn(1, 1, 9, 5, 5, device='cuda')
print('smoke', elsa_op.elsa_function(x, h, kernel_size=3).sum().item())"
if [ $? -ne 0 ]; then
  note "smoke: no working CUDA kernels (see build.log), stopping"
  note "total: $((SECONDS - T0))s of ${BUDGET}s"
  echo; cat "$SUMMARY"; exit 1
fi

# 2. the GPU tests: the modules that hold tests marked `cuda`, only those tests
CUDA_TESTS=$(grep -l "mark.cuda" tests/test_*.py 2>/dev/null | tr '\n' ' ')
if [ -n "$CUDA_TESTS" ]; then
  # shellcheck disable=SC2086
  step tests 180 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=5 -m cuda $CUDA_TESTS
  note "  pytest: $(grep -E '(passed|failed|error|no tests ran)' "$OUT/tests.log" | tail -1)"
else
  skip tests "no test module marks tests with pytest.mark.cuda"
fi

# 3. memcheck of our kernels only (torch's are not instrumented); every tensor its own allocation, so
# that a read past an end is seen
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 120 "$OUT/sanitizer.log" "$SAN" --tool memcheck \
    --kernel-name kns=elsa_op --error-exitcode 9 --print-limit 20 "$PY" tools/gpu_sanitizer_cases.py
  grep -E "ERROR SUMMARY|sanitizer cases done" "$OUT/sanitizer.log" | sed 's/^/  /' >> "$SUMMARY"
else
  skip memcheck "no compute-sanitizer"
fi

# 4. each kernel timed alone at batch 128, then the whole-kernel estimate from this build's code next to it
# (the fused pass is timed with ghost_reduce, and compared with both kernels' estimates)
step bench_op 100 "$OUT/bench.log" "$PY" benchmarks/bench_op.py --device cuda --batch 128 --no-unfold --split \
  --dtypes float32 bfloat16 --layouts channels_last nchw
step estimates 60 "$OUT/budget.log" "$PY" benchmarks/sass_budget.py --arch "$SM" --device "$GPU" \
  --measured "$OUT/bench.log"

# 5. classification, one process through torchrun
step cls_data 60 "$OUT/dist.log" "$PY" cls/make_digits.py "$WORK/digits" --size 32
step cls_dist 120 "$OUT/dist.log" env MASTER_PORT=29517 PYTHON="$PY" bash cls/distributed_train.sh 1 \
  "$WORK/digits" --model elsa_swin_nano --img-size 32 -b 32 -j 2 --epochs 1 --output "$WORK/cls" \
  --experiment gpu_check --device cuda

# 6. detection and segmentation through their distributed tools, if the OpenMMLab stack is there
for project in det seg; do
  package=$([ $project = det ] && echo mmdet || echo mmseg)
  if ! why=$(timeout 60 "$PY" -c "import mmengine, mmcv, $package" 2>&1); then
    skip "${project}_dist" "this python has no working mmengine/mmcv/$package: $(echo "$why" | tail -1)"
    continue
  fi
  # A small config on generated data, as the det/seg tests build them; its paths and arguments go to args.sh.
  # Run from tests/, whose helpers build it (a script read from stdin imports from its working directory).
  step "${project}_config" 60 "$OUT/dist.log" env -C tests "$PY" - "$project" "$WORK/$project" <<'PYEOF' || continue
import shlex, sys
from pathlib import Path
project, work = sys.argv[1], Path(sys.argv[2])
work.mkdir(parents=True, exist_ok=True)
if project == "det":
    from test_det import small_config
    config = small_config(work, "mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py", epochs=1)
    ckpt = work / "work" / "epoch_1.pth"
    classes = ["--cfg-options", "model.roi_head.bbox_head.num_classes=2", "model.roi_head.mask_head.num_classes=2"]
    train, test = classes, ["--eval", "bbox", "segm", *classes]
else:
    from test_seg import small_config
    config = small_config(work, iters=8, ckpt=8)
    ckpt = work / "work" / "iter_8.pth"
    train, test = [], ["--eval", "mIoU"]
words = lambda args: " ".join(shlex.quote(str(a)) for a in args)
(work / "args.sh").write_text(
    f"CONFIG={shlex.quote(str(config))}\nCKPT={shlex.quote(str(ckpt))}\n"
    f"TRAIN_ARGS=({words(train)})\nTEST_ARGS=({words(test)})\n"
)
print("config", config)
PYEOF
  # shellcheck disable=SC1091
  . "$WORK/$project/args.sh"
  step "${project}_dist_train" 150 "$OUT/dist.log" env PORT=29518 PYTHON="$PY" bash "$project/tools/dist_train.sh" \
    "$CONFIG" 1 --work-dir "$WORK/$project/work" "${TRAIN_ARGS[@]}" \
    && step "${project}_dist_test" 90 "$OUT/dist.log" env PORT=29519 PYTHON="$PY" bash "$project/tools/dist_test.sh" \
      "$CONFIG" "$CKPT" 1 --work-dir "$WORK/$project/work" "${TEST_ARGS[@]}"
done

# 7. the rest of the benchmarks
step bench_op_unfold 60 "$OUT/bench.log" "$PY" benchmarks/bench_op.py --device cuda --batch 8 \
  --dtypes float32 bfloat16 --layouts channels_last
step bench_models 120 "$OUT/bench.log" "$PY" benchmarks/bench_models.py --device cuda

note "total: $((SECONDS - T0))s of ${BUDGET}s"
echo; cat "$SUMMARY"
exit $FAILED
