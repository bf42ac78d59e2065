#!/usr/bin/env bash
# Builds the binary wheel dist/elsa_vision-<version>-<python tag>-<platform>.whl, which installs without a
# compiler or CUDA toolkit:
#   bash tools/build_wheel.sh [PYTHON] [DIST]     (defaults: .venv/bin/python, dist/)
# PYTHON's environment needs the torch the wheel is for, setuptools, wheel and ninja, and nvcc for the CUDA
# kernels (or FORCE_CUDA=1). With no GPU visible, elsa_op._C gets code for every arch that torch ships plus
# PTX for the newest (elsa_op/_archs.py; TORCH_CUDA_ARCH_LIST overrides it); without nvcc the wheel has the
# CPU kernels only. The library is built against one torch minor, so the wheel requires exactly that minor
# (torch==2.14.* for torch 2.14.1). The objects are compiled in build/, as for any other install route, so
# a tree that is already built only links them again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
DIST=${2:-dist}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A wheel is for every GPU: without an explicit list, the policy's list for no visible GPU, not this GPU's.
[ -n "${TORCH_CUDA_ARCH_LIST:-}" ] || export CUDA_VISIBLE_DEVICES=
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work" .
built=$(echo "$work"/elsa_vision-*.whl)
[ -f "$built" ] || { echo "build_wheel.sh: pip built no elsa_vision wheel" >&2; exit 1; }

minor=$("$PY" -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))')
"$PY" -m wheel unpack -d "$work/unpacked" "$built" >/dev/null
meta=$(echo "$work"/unpacked/*/*.dist-info/METADATA)
sed -i -E "s/^Requires-Dist: torch( *[<>=!~].*)?$/Requires-Dist: torch==$minor.*/" "$meta"
grep -qx "Requires-Dist: torch==$minor[.][*]" "$meta" ||
  { echo "build_wheel.sh: no torch requirement to pin in $meta" >&2; exit 1; }
mkdir -p "$DIST"
"$PY" -m wheel pack -d "$DIST" "$work"/unpacked/* >/dev/null
wheel=$DIST/$(basename "$built")
[ -f "$wheel" ] || { echo "build_wheel.sh: wheel pack wrote no $wheel" >&2; exit 1; }
echo "$wheel (requires torch==$minor.*)"
