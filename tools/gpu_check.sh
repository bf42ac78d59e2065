#!/usr/bin/env bash
# Checks elsa_op on a GPU machine in one command, from the repository root:
#
#     bash tools/gpu_check.sh            # logs under $OUT (default ./gpu_check_out)
#
# For a machine whose python3 already has torch >= 2.11 (CUDA build), timm, pytest, ninja and nvcc: it
# installs nothing, needs no network and no virtual environment, and imports the packages from the
# working tree (every Python step runs with `-m` from the repository root). Steps, each bounded so that
# the whole stays under BUDGET seconds (default 470, under 8 minutes on one H100):
#   1. build elsa_op._C in place for this GPU's architecture (ptxas register and spill report in build.log)
#   2. the CUDA tests (tests/test_cuda.py) and the kernels' CPU emulation (tests/test_cuda_emulation.py)
#   3. compute-sanitizer memcheck over tools/gpu_sanitizer_cases.py
#   4. benchmarks/bench_op.py at batch 128 (per kernel, GB/s against peak and copy) and at batch 8 against
#      the unfold path; benchmarks/bench_models.py (ELSA-Swin-T vs Swin-T, AMP bfloat16, channels-last)
# summary.txt says what passed, failed or did not fit.
set -u
cd "$(dirname "$0")/.." || exit 2
[ -f setup.py ] && [ -d elsa_op ] || { echo "run from the repository" >&2; exit 2; }

OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-470}
PY=${PYTHON:-python3}
T0=$SECONDS
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
export PYTHONDONTWRITEBYTECODE=1
export MAX_JOBS=${MAX_JOBS:-16}
export FORCE_CUDA=1
# nvcc reads this: every kernel's registers and spills go to build.log.
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }-Xptxas -v"

left() { echo $(( BUDGET - (SECONDS - T0) )); }
note() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME CAP LOG CMD...: CMD with a timeout of min(CAP, time left - 10 s), output appended to LOG.
step() {
  local name=$1 cap=$2 log=$3; shift 3
  local l t s rc verdict
  l=$(left); t=$(( cap < l - 10 ? cap : l - 10 ))
  if [ "$t" -lt 15 ]; then note "$name: SKIPPED (${l}s of the budget left)"; return 99; fi
  echo "===== $name (timeout ${t}s): $*" >> "$log"
  s=$SECONDS
  timeout --kill-after=10 "$t" "$@" >> "$log" 2>&1
  rc=$?
  verdict=ok; [ $rc -ne 0 ] && verdict=FAILED; [ $rc -eq 124 ] && verdict="TIMED OUT"
  note "$name: $verdict (rc=$rc, $((SECONDS - s))s, $(basename "$log"))"
  return $rc
}

# 0. the machine
{
  date; nvidia-smi || true; command -v nvcc && nvcc --version
  $PY -c "import torch, timm, pytest; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)"
  $PY -c "import torch; p = torch.cuda.get_device_properties(0); print(torch.cuda.get_device_name(0), 'cc', torch.cuda.get_device_capability(0), 'SMs', p.multi_processor_count, 'GiB', round(p.total_memory / 2**30))"
} > "$OUT/env.log" 2>&1
note "device: $($PY -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo 'no CUDA device')"

# 1. build for this GPU only (an incremental rebuild on a rerun)
ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null || echo 9.0)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
if ! step build 300 "$OUT/build.log" $PY setup.py build_ext --inplace; then
  # A toolkit-only nvcc may lack the CUDA library headers torch includes; torch's nvidia-* wheels ship them.
  NVINC=$($PY -c "import pathlib, torch; r = pathlib.Path(torch.__file__).resolve().parent.parent; print(':'.join(str(p) for p in sorted(r.glob('nvidia/*/include')) + sorted(r.glob('nvidia/*/*/include'))))")
  if [ -n "$NVINC" ]; then
    export CPATH=$NVINC${CPATH:+:$CPATH}
    note "build: retrying with the nvidia-* wheels' headers on CPATH"
    step build-retry 240 "$OUT/build.log" $PY setup.py build_ext --inplace
  fi
fi
grep -E "bytes spill stores" "$OUT/build.log" | grep -vq " 0 bytes spill stores" \
  && note "ptxas: SPILLS (see build.log)" || note "ptxas: no kernel spills"
if ! $PY -c "
import torch, elsa_op
assert torch._C._dispatch_has_kernel_for_dispatch_key('elsa_op::elsa_forward', 'CUDA'), 'no CUDA kernels'
x, h = torch.randn(1, 8, 5, 5, device='cuda'), torch.randn(1, 1, 9, 5, 5, device='cuda')
print('smoke', elsa_op.elsa_function(x, h, kernel_size=3).sum().item())" >> "$OUT/build.log" 2>&1; then
  note "smoke: FAILED (no CUDA kernels; see build.log), stopping"; cat "$SUMMARY"; exit 1
fi

# 2. tests
step tests 200 "$OUT/tests.log" $PY -m pytest -q -p no:cacheprovider -rfEs --durations=5 \
  tests/test_cuda.py tests/test_cuda_emulation.py
note "tests: $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -1)"

# 3. memcheck (every tensor its own allocation, so that reads past an end are seen)
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
if [ -n "$SAN" ]; then
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  step memcheck 120 "$OUT/sanitizer.log" "$SAN" --tool memcheck --error-exitcode 9 --print-limit 20 \
    $PY -m tools.gpu_sanitizer_cases
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
  grep -E "ERROR SUMMARY|sanitizer cases done" "$OUT/sanitizer.log" | sed 's/^/  /' >> "$SUMMARY"
else
  note "memcheck: SKIPPED (no compute-sanitizer)"
fi

# 4. benchmarks
step bench_op 100 "$OUT/bench.log" $PY -m benchmarks.bench_op --device cuda --batch 128 --no-unfold --split \
  --dtypes float32 bfloat16 --layouts channels_last nchw
step bench_op_unfold 60 "$OUT/bench.log" $PY -m benchmarks.bench_op --device cuda --batch 8 --dtypes float32 bfloat16 \
  --layouts channels_last
step bench_models 120 "$OUT/bench.log" $PY -m benchmarks.bench_models --device cuda

note "total: $((SECONDS - T0))s of ${BUDGET}s"
echo; cat "$SUMMARY"
