#!/usr/bin/env bash
# Put what the GPU machine lacks into .whl/ (git-ignored, carried by the device call):
# - the CUTLASS/CuTe headers (nvidia-cutlass, pure Python + headers);
# - .whl/prebuilt/: raekern's CUDA build (sm_80 + sm_90a) made here by tools/cuda_build.sh against
#   torch 2.14.1 + CUDA 13.0, with the torch version it was built for. gpu_check.sh uses it when the
#   device's torch is that version and the library imports there, and saves the ~4-minute build of
#   device time; otherwise it builds on the device as before. SKIP_PREBUILT=1 leaves it out.
#   The lent H200's image had Python 3.12 and torch 2.11.0+cu130 when last read (device KINDS.md,
#   2026-11). A prebuilt for it: VENV_CU=<a Python 3.12 venv with torch==2.11.0, numpy, ninja, cmake and
#   nvidia-cutlass --no-deps> bash tools/prepare_gpu_check.sh (raekern builds and passes the CPU suite
#   against torch 2.11.0+cu130 as well as 2.14.1).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl nvidia-cutlass==4.2.0.0
if [ "${SKIP_PREBUILT:-0}" != 1 ]; then
  VENV=${VENV_CU:-/opt/venv-cu}
  VENV_CU=$VENV bash tools/cuda_build.sh build/cu-prebuilt
  rm -rf .whl/prebuilt && mkdir -p .whl/prebuilt
  cp build/cu-prebuilt/lib/raekern/_C*.so build/cu-prebuilt/lib/raekern/_emu*.so .whl/prebuilt/
  cp build/cu-prebuilt/ptxas.txt build/cu-prebuilt/cubins.txt .whl/prebuilt/
  "$VENV/bin/python" -c "import torch; print(torch.__version__)" > .whl/prebuilt/torch_version.txt
  bash benchmarks/gpu_check.sh --source-hash > .whl/prebuilt/source_hash.txt
fi
ls -la .whl .whl/prebuilt 2>/dev/null
