#!/usr/bin/env bash
# Builds the Python extension in place and the CMake tree (libtorchmha, tests, demo, benchmark
# loop) in build/. Incremental: only what changed is compiled again.
# Usage: scripts/build.sh [CMake targets]   (every target when none is named)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -d /usr/lib/ccache ]]; then
  # ccache's compiler links come first; the editable install compiles in a temporary folder, and
  # ccache lets the in-place build and the CMake build reuse that work.
  export PATH=/usr/lib/ccache:$PATH CCACHE_NOHASHDIR=1 CCACHE_BASEDIR=$PWD
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

if ! .venv/bin/python -m pip show -q torchmha >/dev/null 2>&1; then
  echo "build: installing torchmha into .venv (editable, --no-build-isolation)"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
else
  echo "build: Python extension (in place)"
  .venv/bin/python setup.py -q build_ext --inplace
fi

echo "build: CMake tree in build/"
torch_prefix=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DTORCHMHA_PYTHON="$PWD/.venv/bin/python" >/dev/null
if (($#)); then
  cmake --build build --target "$@"
else
  cmake --build build
fi
