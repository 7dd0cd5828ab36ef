#!/usr/bin/env bash
# Builds the Python extension in place and the CMake tree (libtorchmha, tests, demo, benchmark
# loop) in build/. Incremental: only what changed is compiled again.
# Usage: scripts/build.sh [CMake targets]   (every target when none is named)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -d /usr/lib/ccache ]]; then
  # ccache's compiler links come first: a fresh clone reuses what any earlier build compiled.
  # The sloppiness lets it cache the test files that use the precompiled header, too.
  export PATH=/usr/lib/ccache:$PATH CCACHE_NOHASHDIR=1 CCACHE_BASEDIR=$PWD \
    CCACHE_SLOPPINESS=pch_defines,time_macros
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# In place, with its objects in build/temp.*: the wheel that scripts/check_packaging.sh builds
# then reuses them instead of compiling the extension a second time.
echo "build: Python extension (in place)"
.venv/bin/python setup.py -q build_ext --inplace
# .venv imports torchmha from python/, as an editable install would.
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/python" >"$site_packages/torchmha-source-tree.pth"

echo "build: CMake tree in build/"
torch_prefix=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DTORCHMHA_PYTHON="$PWD/.venv/bin/python" >/dev/null
if (($#)); then
  cmake --build build --target "$@"
else
  cmake --build build
fi
