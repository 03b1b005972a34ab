#!/usr/bin/env bash
# Compile ONE .cu file of raekern with the flags of the CUDA build (sm_80 + sm_90a, -Xptxas -v) and
# gate it with tools/check_ptxas.py: a quick "does my kernel compile without spills" check while
# developing, without building the whole library. Usage: tools/nvcc_one.sh csrc/<family>/<op>.cu
# Needs a Python with torch 2.14.1 (CUDA) and nvidia-cutlass: VENV_CU (default .venv-cu, else /opt/venv-cu).
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?usage: tools/nvcc_one.sh csrc/<family>/<op>.cu}
VENV=${VENV_CU:-.venv-cu}
[ -x "$VENV/bin/python" ] || VENV=/opt/venv-cu
SP=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc=$(command -v nvcc)
  real=$(grep -o '/[^ "]*/bin/nvcc' "$nvcc" 2>/dev/null | head -1 || true)
  CUDA_HOME=$(dirname "$(dirname "${real:-$nvcc}")")
fi
ARCHS=${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}
GENCODE=()
for a in ${ARCHS//;/ }; do c=${a//./}; GENCODE+=("-gencode=arch=compute_$c,code=sm_$c"); done
LOG=$(mktemp)
"$CUDA_HOME/bin/nvcc" -DRAEKERN_WITH_CUDA=1 -DRAEKERN_HAVE_CUTLASS=1 -D_GLIBCXX_USE_CXX11_ABI=1 \
  -I"$CUDA_HOME/include" -I"$SP/nvidia/cu13/include" -I"$SP/cutlass_library/source/include" -Icsrc \
  -I"$SP/torch/include" -I"$SP/torch/include/torch/csrc/api/include" \
  -isystem="$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['include'])")" \
  -O3 -DNDEBUG -std=c++20 --expt-relaxed-constexpr --expt-extended-lambda -lineinfo -Xptxas=-v \
  -Xcompiler=-fPIC -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ "${GENCODE[@]}" \
  -x cu -c "$SRC" -o /dev/null > "$LOG" 2>&1 || { cat "$LOG"; exit 1; }
"$VENV/bin/python" tools/check_ptxas.py "$LOG"
