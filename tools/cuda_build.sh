#!/usr/bin/env bash
# Build raekern with its CUDA kernels into OUT (default build/cu) without touching the in-place
# CPU build: a .venv-cu with torch 2.14.1 (CUDA 13.0) and the nvidia-cutlass headers, nvcc from
# CUDA_HOME (or the real compiler behind the nvcc on PATH), TORCH_CUDA_ARCH_LIST (default
# "8.0;9.0a"). Then gate on ptxas spills/warnings and list the cubins in the library.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/cu}
VENV=${VENV_CU:-.venv-cu}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, cutlass_library" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
  "$VENV/bin/pip" install -q torch==2.14.1 numpy pytest pytest-benchmark hypothesis safetensors ninja cmake scikit-learn matplotlib transformers
  "$VENV/bin/pip" install -q --no-deps nvidia-cutlass==4.2.0.0
fi
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc=$(command -v nvcc)
  # The nvcc on PATH may be a wrapper script; take the toolkit of the compiler it runs.
  real=$(grep -o '/[^ "]*/bin/nvcc' "$nvcc" 2>/dev/null | head -1 || true)
  CUDA_HOME=$(dirname "$(dirname "${real:-$nvcc}")")
fi
export CUDA_HOME
mkdir -p "$OUT"
echo "CUDA_HOME=$CUDA_HOME archs=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
RAEKERN_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}" \
  "$VENV/bin/python" setup.py -q build_py -d "$OUT/lib" build_ext -b "$OUT/lib" -t "$OUT/tmp" \
  > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; echo "CUDA build failed (log: $OUT/build.log)"; exit 1; }
"$VENV/bin/python" tools/check_ptxas.py "$OUT/build.log" --report "$OUT/ptxas.txt"
CUOBJDUMP=$(command -v cuobjdump || ls "$VENV"/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump)
echo "cubins in the built library:"
"$CUOBJDUMP" --list-elf "$OUT"/lib/raekern/_C*.so | tee "$OUT/cubins.txt"
grep -q sm_ "$OUT/cubins.txt" || { echo "no cubins in the CUDA build"; exit 1; }
