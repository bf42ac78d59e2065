#!/usr/bin/env bash
# Builds the mmcv wheel that mmdet 3.3 / mmseg 1.2 need (only a source tarball is on PyPI) into a wheel
# cache, once; later set-ups install it in seconds.
#   bash tools/build_mmcv_wheel.sh PYTHON WHEEL_DIR
# The sources ask for -std=c++14/17, but torch 2.14's headers need C++20. CUDA ops are built where a GPU
# is visible (mmcv's own rule) or with MMCV_FORCE_CUDA=1 and TORCH_CUDA_ARCH_LIST; CPU ops otherwise.
# FORCE_CUDA, which asks for elsa_op's CUDA kernels, is not passed on: mmcv reads the same variable, and
# its CUDA ops take an hour on a small machine with no GPU to run them.
set -euo pipefail
PY=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")  # absolute, symlink kept: the venv's python
mkdir -p "$2"
WHEELS=$(cd "$2" && pwd)
VERSION=${MMCV_VERSION:-2.1.0}
if ls "$WHEELS"/mmcv-"$VERSION"-*.whl >/dev/null 2>&1; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$work" "mmcv==$VERSION"
tar -xzf "$work"/mmcv-"$VERSION".tar.gz -C "$work"
src="$work/mmcv-$VERSION"
sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$src/setup.py"
echo "[build_mmcv_wheel] compiling mmcv $VERSION ops (several minutes on 2 cores)" >&2
(cd "$src" && env -u FORCE_CUDA ${MMCV_FORCE_CUDA:+FORCE_CUDA=1} MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEELS" .)
