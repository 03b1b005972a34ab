#!/usr/bin/env bash
# Put the wheels the GPU machine lacks into .whl/ (git-ignored, carried by the device call):
# the CUTLASS/CuTe headers (nvidia-cutlass, pure Python + headers).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl nvidia-cutlass==4.2.0.0
ls -la .whl
