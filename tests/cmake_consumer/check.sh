#!/usr/bin/env bash
# Installs torchmha from a build tree, builds this out-of-tree project against the installed
# package, and runs it. Usage: check.sh <torchmha build dir> <fixtures dir>
set -euo pipefail
build=$(cd "$1" && pwd)
fixtures=$2
here=$(cd "$(dirname "$0")" && pwd)
prefix=$build/install
consumer=$build/cmake_consumer

cmake --install "$build" --prefix "$prefix" >/dev/null
torch_dir=$(sed -n 's/^Torch_DIR:PATH=//p' "$build/CMakeCache.txt")
# Where the build was told where a CUDA LibTorch's toolkit lies, the consumer is told too.
cuda_args=()
for variable in CUDA_TOOLKIT_ROOT_DIR CUDAToolkit_ROOT CUDA_nvrtc_LIBRARY CUDA_NVRTC_LIB; do
  value=$(sed -n "s/^$variable:[A-Z]*=//p" "$build/CMakeCache.txt")
  if [[ -n $value && $value != *NOTFOUND ]]; then
    cuda_args+=("-D$variable=$value")
  fi
done
launcher=()
if command -v ccache >/dev/null; then
  # Paths relative to the checkout, so that a fresh clone reuses an earlier clone's compilation.
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
  export CCACHE_BASEDIR=$(cd "$here/../.." && pwd) CCACHE_NOHASHDIR=1
fi
cmake -S "$here" -B "$consumer" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$prefix" -DTorch_DIR="$torch_dir" "${launcher[@]}" "${cuda_args[@]}" \
  >/dev/null
cmake --build "$consumer"

model=$fixtures/block_scripted.pt
"$consumer/consumer" "$model"
"$consumer/consumer_scripted_only" "$model"
# The control must miss the op: proof that the header's anchor is what keeps it registered.
if "$consumer/consumer_without_header" "$model"; then
  echo "check: the control program found the op; --as-needed did not drop the library" >&2
  exit 1
fi
readelf -d "$consumer/consumer_scripted_only" | grep -q 'libtorchmha' ||
  { echo "check: consumer_scripted_only does not depend on libtorchmha" >&2; exit 1; }
echo "check: the installed package builds, links and registers the op"
