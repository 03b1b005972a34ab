#!/usr/bin/env bash
# Put what the GPU machine lacks into .whl/ (git-ignored, carried by the device call):
# - the CUTLASS/CuTe headers (nvidia-cutlass, pure Python + headers);
# - .whl/prebuilt/: raekern's CUDA build (sm_90a) made here by tools/cuda_build.sh against
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
  # The device's host CPU is not this one: the CPU kernels are compiled for x86-64-v4 (AVX-512 F/BW/
  # DQ/VL/CD: Sapphire/Emerald Rapids, Ice Lake, Zen 4/5), not -march=native (AVX512-FP16 and AMX
  # would be an illegal instruction on an AMD host). gpu_check.sh builds on the device when its CPU
  # lacks one of the flags in cpu_flags.txt.
  ARCH=${PREBUILT_CPU_ARCH:-x86-64-v4}
  FLAGS="avx avx2 fma bmi1 bmi2 f16c movbe avx512f avx512bw avx512cd avx512dq avx512vl"
  h0=$(bash benchmarks/gpu_check.sh --source-hash)
  # A clean build: ptxas.txt then covers every kernel, not only the files an incremental build redid.
  [ "${PREBUILT_INCREMENTAL:-0}" = 1 ] || rm -rf build/cu-prebuilt
  # sm_90a only (the lent GPUs are Hopper; CI builds and gates sm_80 too): half the cubins, and the
  # working tree that travels to the device stays under its 64 MiB (the sm_80+sm_90a library was 41 MB).
  TORCH_CUDA_ARCH_LIST=${PREBUILT_ARCHS:-9.0a} RAEKERN_CPU_ARCH=$ARCH VENV_CU=$VENV bash tools/cuda_build.sh build/cu-prebuilt
  [ "$(bash benchmarks/gpu_check.sh --source-hash)" = "$h0" ] || { echo "csrc changed during the build"; exit 1; }
  rm -rf .whl/prebuilt && mkdir -p .whl/prebuilt
  # Only the extension suffix of the device's Python (one build dir may hold several).
  SUF=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  cp "build/cu-prebuilt/lib/raekern/_C$SUF" "build/cu-prebuilt/lib/raekern/_emu$SUF" .whl/prebuilt/
  cp build/cu-prebuilt/ptxas.txt build/cu-prebuilt/cubins.txt .whl/prebuilt/
  "$VENV/bin/python" -c "import torch; print(torch.__version__)" > .whl/prebuilt/torch_version.txt
  echo "$FLAGS" > .whl/prebuilt/cpu_flags.txt
  echo "$h0" > .whl/prebuilt/source_hash.txt
  du -sh .whl
  # What a device call carries: the tracked files and .whl, at most 64 MiB together.
  total=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -cb .whl | tail -1 | cut -f1) ))
  echo "tracked files + .whl: $(( total >> 20 )) MiB of the device call's 64"
  [ $total -lt $(( 62 << 20 )) ] || echo "WARNING: close to the 64 MiB the device call carries"
fi
ls -la .whl .whl/prebuilt 2>/dev/null
