#!/usr/bin/env bash
# One entry point that sets everything up, then runs a job:
#   bash run.sh demo    train a small ELSA-Swin on scikit-learn's digits and evaluate it on the held-out split
#   bash run.sh test    run the test suite
#   bash run.sh check   run the checks CI runs before the tests: ruff (lint, format), mypy, clang-format,
#                       and the docs site (mkdocs build --strict)
#   bash run.sh bench   run the benchmarks
#   bash run.sh setup   only set up (.venv/, dependencies, the compiled operator)
# The set-up is idempotent: a second run reuses .venv/ and the built extension and takes seconds.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python

log() { echo "[run.sh] $*" >&2; }

setup() {
  if [ ! -x "$PY" ]; then
    log "creating $VENV"
    "$(command -v python3.11 || command -v python3)" -m venv "$VENV"
  fi
  local want have wheels
  want=$(cat requirements.txt requirements-mm.txt tools/build_mmcv_wheel.sh | sha256sum | cut -d' ' -f1)
  have=$(cat "$VENV/.requirements.sha256" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    log "installing requirements.txt (torch is several GB the first time)"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -r requirements.txt
    # mmcv has no wheel on PyPI: build one once into a cache that every checkout of the user shares.
    wheels=${ELSA_WHEEL_CACHE:-$HOME/.cache/elsa/wheels}
    bash tools/build_mmcv_wheel.sh "$PY" "$wheels"
    log "installing requirements-mm.txt"
    "$PY" -m pip install -q --find-links "$wheels" --only-binary mmcv -r requirements-mm.txt
    echo "$want" > "$VENV/.requirements.sha256"
  fi
  # The project itself, installed editable (every package: elsa_op, elsa_swin, elsa_cls, elsa_mm), again
  # only when its metadata or the build's settings change. It compiles elsa_op._C into build/ and places it
  # in elsa_op/; then `build_ext --inplace` rebuilds it only when a source is newer than the library,
  # compiling only what changed, from the same objects (setup.py keeps them in build/ for every route).
  want=$(cat pyproject.toml setup.py elsa_op/_archs.py <(echo "${FORCE_CUDA-} ${TORCH_CUDA_ARCH_LIST-} ${DEBUG-}") |
    sha256sum | cut -d' ' -f1)
  have=$(cat "$VENV/.project.sha256" 2>/dev/null || true)
  if [ "$want" != "$have" ]; then
    log "installing the project (pip install -e .[mm]; compiles elsa_op._C, several minutes the first time)"
    MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-build-isolation --no-deps -e ".[mm]" \
      >"$VENV/install.log" 2>&1 || { cat "$VENV/install.log"; log "installing the project failed"; exit 1; }
    echo "$want" > "$VENV/.project.sha256"
  fi
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" setup.py -q build_ext --inplace >"$VENV/build_ext.log" 2>&1 ||
    { cat "$VENV/build_ext.log"; log "building elsa_op._C failed"; exit 1; }
}

check() {
  local bin=$VENV/bin site
  log "ruff check"; "$bin/ruff" check .
  log "ruff format --check"; "$bin/ruff" format --check .
  log "mypy"; "$bin/mypy"
  log "clang-format"
  git ls-files -z 'elsa_op/csrc/*' 'tests/cuda_emulation/*' | grep -zE '[.](h|cpp|cu|cuh)$' |
    xargs -0 "$bin/clang-format" --dry-run --Werror
  site=$(mktemp -d)
  log "mkdocs build --strict"; NO_MKDOCS_2_WARNING=1 "$bin/mkdocs" build --strict -q -d "$site"
  rm -rf "$site"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  test) setup; exec "$PY" -m pytest tests -q "$@" ;;
  check) setup; check ;;
  bench) setup; "$PY" benchmarks/bench_op.py "$@" ;;
  demo)
    setup
    cd cls
    "$PY" make_digits.py ../data/digits
    rm -rf ../output/digits-demo
    "$PY" train.py ../data/digits --model elsa_swin_nano --img-size 32 --epochs 15 -b 64 -j 2 --lr 2e-3 \
      --warmup-epochs 1 --cooldown-epochs 0 --scale 0.7 1 --hflip 0 --drop-path 0.05 --log-interval 10 \
      --output ../output --experiment digits-demo "$@"
    "$PY" validate.py ../data/digits --model elsa_swin_nano --img-size 32 -j 2 \
      --checkpoint ../output/digits-demo/model_best.pth.tar --results-file ../output/digits-demo/val_results.json
    # One held-out digit: its top-5 classes, and a picture of what the ELSA layers attend to.
    sample=$(find ../data/digits/val -name '*.png' | sort | head -n 1)
    "$PY" predict.py "$sample" --model elsa_swin_nano --img-size 32 --checkpoint ../output/digits-demo/model_best.pth.tar
    "$PY" visualize.py "$sample" --model elsa_swin_nano --img-size 32 \
      --checkpoint ../output/digits-demo/model_best.pth.tar -o ../output/digits-demo/attention.png
    log "held-out top-1 in output/digits-demo/val_results.json; training curves in output/digits-demo/curves.png;"
    log "attention of a held-out digit in output/digits-demo/attention.png"
    ;;
  *) echo "usage: bash run.sh {demo|test|check|bench|setup} [args]" >&2; exit 2 ;;
esac
