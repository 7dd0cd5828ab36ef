#!/usr/bin/env bash
# Compatibility check, not part of CI: for each PyTorch release, a virtual environment outside the
# repository (made once, then reused), a copy of the working tree built against that release (the
# Python extension and the CMake tree), the C++ tests (ctest) and the whole Python suite. Prints
# one line of pass counts per release, and writes them to results-<version>.txt beside the
# environments. A CPU run: the CUDA kernels are left out (TORCHMHA_CUDA=0). Where the main build
# (.venv, build/) has made its AOTInductor packages, every other release also runs those.
#
# Usage: scripts/compat.sh [VERSION ...]   (default: 2.13.0 2.14.1 2.15.0)
# TORCHMHA_COMPAT_DIR (default ~/.cache/torchmha-compat) holds the environments and the builds.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
compat_dir=${TORCHMHA_COMPAT_DIR:-$HOME/.cache/torchmha-compat}
mkdir -p "$compat_dir"
versions=("$@")
((${#versions[@]})) || versions=(2.13.0 2.14.1 2.15.0)
main_version=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
# The development requirements other than torch, pinned as CI pins them.
mapfile -t tools < <(grep -v '^torch==' scripts/requirements-dev.txt | grep -v '^#' | grep .)

# This machine's pip caps torch at the newest release it keeps on disk; a newer release comes from
# the package index, past that cap, for this one install.
install_torch() {
  local python=$1 version=$2 no_cap
  if "$python" -m pip install -q "torch==$version"; then
    return
  fi
  no_cap=$(mktemp)
  echo "compat: torch $version is above this machine's pip cap; installing it past the cap"
  PIP_CONSTRAINT=$no_cap "$python" -m pip install -q "torch==$version"
  rm -f "$no_cap"
}

check_version() {
  local version=$1 venv=$compat_dir/torch-$1 tree=$compat_dir/tree-$1
  local python=$venv/bin/python
  if [[ ! -x $python ]]; then
    python3 -m venv "$venv"
  fi
  if [[ $("$python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null) != "$version" ]]; then
    echo "compat: installing torch $version into $venv"
    install_torch "$python" "$version"
  fi
  "$python" -m pip install -q "${tools[@]}"

  echo "compat: torch $version: copying the working tree to $tree"
  mkdir -p "$tree"
  git ls-files -z --cached --others --exclude-standard |
    tar -c --null -T - -f - | tar -x -f - -C "$tree"
  cd "$tree"
  export TORCHMHA_CUDA=0 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  [[ -d /usr/lib/ccache ]] && export PATH=/usr/lib/ccache:$PATH CCACHE_NOHASHDIR=1 CCACHE_BASEDIR=$tree
  echo "compat: torch $version: building"
  "$python" setup.py -q build_ext --inplace >/dev/null
  local torch_prefix
  torch_prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  local cuda_args=()
  if [[ -n $("$python" -c 'import torch; print(torch.version.cuda or "")') ]]; then
    # A CUDA build of LibTorch looks for the toolkit even when torchmha's kernels are left out.
    for cuda_root in "${CUDA_HOME:-}" /usr/local/cuda; do
      if [[ -n $cuda_root && -f $cuda_root/include/cuda.h ]]; then
        cuda_args=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_root" -DCUDAToolkit_ROOT="$cuda_root")
        break
      fi
    done
  fi
  if ((${#cuda_args[@]})) && ! compgen -G "$cuda_root/lib64/libnvrtc.so*" >/dev/null; then
    # A toolkit without NVRTC: the one that came with PyTorch's wheels (nvidia/*/lib).
    local nvrtc
    nvrtc=$(find "$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia" \
      -name 'libnvrtc.so*' ! -name '*builtins*' ! -name '*alt*' 2>/dev/null | head -n 1)
    [[ -n $nvrtc ]] && cuda_args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc" -DCUDA_NVRTC_LIB="$nvrtc")
  fi
  cmake -S . -B build -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" -DTORCHMHA_PYTHON="$python" \
    -DTORCHMHA_BUILD_BENCHMARK=OFF -DTORCHMHA_CUDA=OFF "${cuda_args[@]}" >/dev/null
  cmake --build build >/dev/null

  echo "compat: torch $version: ctest and pytest"
  # The fixture scripts that ctest runs import torchmha from this copy, as pytest does.
  export PYTHONPATH=$tree/python
  local ctest_line pytest_line foreign=()
  ctest_line=$(cd build && ctest -j "$(nproc)" 2>&1 | tee ctest.log | grep "tests passed" || true)
  # Packages made by the main build's PyTorch, for tests/python/test_aoti_across_releases.py.
  if [[ -f $root/build/aoti_fixtures/expected.pt && $version != "$main_version" ]]; then
    foreign=("TORCHMHA_FOREIGN_AOTI_PACKAGES=$root/build/aoti_fixtures")
  fi
  pytest_line=$(env "${foreign[@]}" "$python" -m pytest tests/python -q \
    -p no:cacheprovider 2>&1 | tee pytest.log | tail -n 1)
  cd "$root"
  local summary="torch $version: ctest: ${ctest_line:-no summary (see $tree/build/ctest.log)}; pytest: $pytest_line"
  echo "$summary" | tee "$compat_dir/results-$version.txt"
}

for version in "${versions[@]}"; do
  check_version "$version"
done
echo "compat: summary"
for version in "${versions[@]}"; do
  cat "$compat_dir/results-$version.txt"
done
