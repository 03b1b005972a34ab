#!/usr/bin/env bash
# raekern on aarch64 (Grace/GH200 hosts, Graviton, Ampere) without an aarch64 machine: cross-build
# the CPU kernels and the host emulation with aarch64-linux-gnu-g++, then run the CPU test suite
# under qemu-user with PyPI's aarch64 torch wheel. Debian/Ubuntu, as root (apt). Run from a built
# checkout (`make build`: its .venv supplies pip, cmake and ninja).
#
#   bash tools/arm64_check.sh [pytest args]     default: the suite less what qemu cannot run (below)
#
# What it cannot cover: torch.compile (inductor compiles C++ with a native compiler, absent here)
# and speed. Tests that start aarch64 subprocesses need binfmt_misc (registered below when allowed).
# Work folder: $ARM_DIR (default /tmp/raekern-arm64); $ARM_MARCH the -march (default armv8.2-a+fp16+dotprod, the
# Neoverse-N1 / Graviton2 baseline; Grace is armv9-a).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
W=${ARM_DIR:-/tmp/raekern-arm64}
MARCH=${ARM_MARCH:-armv8.2-a+fp16+dotprod}
TORCH_SPEC=${ARM_TORCH:-torch==2.13.0}
VENV=${VENV:-$ROOT/.venv}
SYSROOT=$W/sysroot SITE=$W/site STUBS=$W/stubs BUILD=$W/build TREE=$W/tree
PYVER=3.11
mkdir -p "$W"
stamp() { echo "[arm64 $(date +%T)] $*"; }
# pip through this mirror warns about every index folder it lacks; keep its real messages.
quiet_pip() { "$@" 2>&1 | { grep -v -e "is ignored: it is neither" -e "already exists" || true; }; return "${PIPESTATUS[0]}"; }

stamp "toolchain and qemu"
if ! command -v aarch64-linux-gnu-g++ >/dev/null || ! command -v qemu-aarch64-static >/dev/null \
   || ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++-aarch64-linux-gnu qemu-user-static >/dev/null
fi

stamp "aarch64 Python $PYVER sysroot"
if [ ! -x "$SYSROOT/usr/bin/python$PYVER" ]; then
  mkdir -p "$W/debs" "$SYSROOT" && cd "$W/debs"
  for p in libc6 libgcc-s1 libstdc++6 libgomp1 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5 \
           libsqlite3-0 libuuid1 libncursesw6 libtinfo6 libreadline8 libcrypt1 libzstd1 \
           "python$PYVER-minimal" "libpython$PYVER-minimal" "libpython$PYVER-stdlib" \
           "libpython$PYVER" "libpython$PYVER-dev" "python$PYVER"; do
    apt-get download -q "$p:arm64" >/dev/null 2>&1 || { echo "apt-get download $p:arm64 failed" >&2; exit 1; }
  done
  for d in *.deb; do dpkg -x "$d" "$SYSROOT"; done
  cd "$ROOT"
fi
# qemu-user reads /proc and /sys from the host; torch's CPU detection (cpuinfo, oneDNN's
# xbyak_aarch64) then finds no ARM CPU and crashes. qemu looks under -L first, so give it a
# two-core Neoverse-N1's files there.
mkdir -p "$SYSROOT/proc" "$SYSROOT/sys/devices/system/cpu"
: > "$SYSROOT/proc/cpuinfo"
for c in 0 1; do
  d=$SYSROOT/sys/devices/system/cpu/cpu$c/regs/identification
  mkdir -p "$d" && echo 0x00000000413fd0c1 > "$d/midr_el1" && echo 0x0 > "$d/revidr_el1"
  printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$c" >> "$SYSROOT/proc/cpuinfo"
done
for f in possible present online; do echo 0-1 > "$SYSROOT/sys/devices/system/cpu/$f"; done

stamp "aarch64 $TORCH_SPEC and the test dependencies"
if [ ! -d "$SITE/torch" ]; then
  PIPT=("$VENV/bin/pip" install -q --target "$SITE" --platform manylinux_2_28_aarch64
        --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64
        --python-version "$PYVER" --only-binary=:all:)
  # --no-deps: the wheel's CUDA libraries are replaced by stand-ins below.
  quiet_pip "${PIPT[@]}" --no-deps "$TORCH_SPEC"
  quiet_pip "${PIPT[@]}" typing_extensions sympy networkx filelock jinja2 fsspec numpy pytest hypothesis pillow setuptools \
    safetensors scikit-learn matplotlib
fi
stamp "stand-ins for the CUDA libraries the wheel links against"
"$VENV/bin/python" "$ROOT/tools/arm64_cuda_stubs.py" "$SITE/torch" "$SYSROOT" "$STUBS" >/dev/null

stamp "cross-build (-march=$MARCH)"
mkdir -p "$BUILD" && cd "$BUILD"
EXT=cpython-${PYVER/./}-aarch64-linux-gnu.so
T=$SITE/torch
"$VENV/bin/cmake" "$ROOT" -GNinja -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" \
  -DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
  -DPython3_EXECUTABLE="$(command -v python3)" -DPython3_INCLUDE_DIR="$SYSROOT/usr/include/python$PYVER" \
  -DRAEKERN_OUTPUT_DIR="$BUILD/out" -DRAEKERN_OUTPUT_NAME="_C.$EXT" \
  "-DTORCH_INCLUDES=$T/include;$T/include/torch/csrc/api/include;$SYSROOT/usr/include" \
  -DTORCH_LIBDIR="$T/lib" -DTORCH_CXX11_ABI=1 -DRAEKERN_CPU_ARCH="$MARCH" -DCMAKE_BUILD_TYPE=Release \
  -DRAEKERN_CUDA=OFF -DRAEKERN_EMULATION=ON "-DCMAKE_MODULE_LINKER_FLAGS=-Wl,-rpath-link,$STUBS" >cmake.log
"$VENV/bin/cmake" --build . -- -j"$(nproc)" | tail -1

stamp "tests under qemu-aarch64"
# With binfmt_misc, aarch64 programs that the tests start (the CLI, bench scripts, distributed
# ranks) run under qemu too; without it those tests fail with "Exec format error".
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e $BINFMT/register ]; then mount -t binfmt_misc binfmt_misc $BINFMT 2>/dev/null || true; fi
if [ ! -e $BINFMT/qemu-aarch64 ] && [ -w $BINFMT/register ] && [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ]; then
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > $BINFMT/register || true
fi
[ -e $BINFMT/qemu-aarch64 ] || echo "binfmt_misc unavailable: tests that start subprocesses will fail" >&2
rm -rf "$TREE" && mkdir -p "$TREE"
(cd "$ROOT" && git ls-files -z | xargs -0 cp --parents -t "$TREE")
cp "$BUILD"/out/*.so "$TREE/raekern/"
cd "$TREE"
ARGS=("$@")
# Left out by default: torch.compile cases; test_bench.py (the bench CLI's plumbing, pure Python,
# and a measuring run that takes many minutes under qemu); the digits CLI's CPU-seconds bound
# (qemu runs about 3x over it) and the digits training smoke run (past its 600 s limit under qemu).
[ ${#ARGS[@]} -gt 0 ] || ARGS=(python_tests -q -p no:cacheprovider -rf -k "not compile"
  --ignore=python_tests/test_bench.py
  --deselect=python_tests/test_digits.py::test_raekern_sample_without_checkpoints_writes_a_digit_grid
  --deselect=python_tests/test_digits.py::test_quick_pipeline_smoke)
# A .pth file rather than PYTHONPATH: tests give their subprocesses a PYTHONPATH of their own.
echo "$SITE" > "$SYSROOT/usr/lib/python3/dist-packages/zz-raekern-arm64-site.pth"
export QEMU_LD_PREFIX="$SYSROOT" QEMU_CPU=max OMP_NUM_THREADS=2 \
  LD_LIBRARY_PATH="$STUBS:$SYSROOT/usr/lib/aarch64-linux-gnu"
unset PYTHONPATH
exec qemu-aarch64-static "$SYSROOT/usr/bin/python$PYVER" -m pytest "${ARGS[@]}"
