#!/usr/bin/env bash
# The GPU check, for a machine with CUDA and PyTorch already installed (no network needed):
# builds the extension from source against that PyTorch, runs every Python test (the CUDA ones
# included); meanwhile builds the CMake tree (library, GoogleTest suite, examples, C++ timing
# loop) in build-gpu/ and runs ctest there (every C++ test; tests/cpp/test_cuda.cpp and the CUDA
# AOTInductor package run on the GPU); then runs the GPU benchmark (scripts/bench/bench.py
# --device cuda) and profiles the cases furthest from their goals (scripts/bench/profile_call.py,
# appended to bench.log).
#
# Usage: OUT=/some/folder scripts/gpu_check.sh [tests] [ctest] [bench] [decode] [profile]   (all
# when none is named). TORCHMHA_COMMIT=<commit> labels the results where the copy's .git is not
# the tree's. Writes at most thirteen files under $OUT: summary.txt (machine, pass counts, build
# time, goals), build.log, cmake.log, pytest.log, ctest.log, bench.log,
# bench/cuda-<card>.{json,md,png}, and for the decoding suite decode.log and
# bench/cuda-<card>-decode.{json,md,png}.
#
# GoogleTest: the GPU machine has none and no network. Before the run, on the machine that starts
# it, copy the sources that libgtest-dev installs into the ignored folder build-gpu/googletest-src
# and carry that folder with the working tree (the `run` tool's `carry`):
#   mkdir -p build-gpu && rm -rf build-gpu/googletest-src &&
#     cp -r /usr/src/googletest build-gpu/googletest-src
#   carry: ["build-gpu/googletest-src"]
# CMake uses an installed GoogleTest first, else TORCHMHA_GTEST_SOURCE_DIR (this folder by default).
#
# Time limits (seconds): BUILD_TIMEOUT_S (CMake tree, 480), TEST_TIMEOUT_S (pytest, 300),
# CTEST_TIMEOUT_S (ctest, 420), BENCH_TIMEOUT_S (300), DECODE_TIMEOUT_S (decoding suite, 240). CTEST_JOBS (default 6) runs beside pytest.
# TORCHMHA_REQUIRE_CUDA=1 (the default here) fails the C++ CUDA tests instead of skipping them
# where LibTorch sees no device. A dry run of the C++ part on a machine without a GPU
# (SKIP_INSTALL=1 uses the torchmha already installed in $PYTHON; TORCHMHA_CMAKE_ARGS adds
# configure arguments):
#   SKIP_INSTALL=1 TORCHMHA_REQUIRE_CUDA=0 PYTHON=$PWD/.venv/bin/python OUT=/tmp/x \
#     TORCHMHA_CMAKE_ARGS=-DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON scripts/gpu_check.sh ctest
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/gpu-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
cores=$(nproc)
export MAX_JOBS=${MAX_JOBS:-$cores} PYTHONUNBUFFERED=1
# The system compiler, whose libstdc++ is the one loaded at run time: an extension built by a
# newer g++ (a CXX pointing elsewhere) crashed in its inline iostream code against the older one.
export CXX=${TORCHMHA_CXX:-c++}
summary=$OUT/summary.txt
steps=${*:-tests ctest bench decode profile}
status=0
export TORCHMHA_REQUIRE_CUDA=${TORCHMHA_REQUIRE_CUDA:-1}
gtest_source=${TORCHMHA_GTEST_SOURCE_DIR:-$PWD/build-gpu/googletest-src}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "${TORCHMHA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "commit unknown")}"
  "$CXX" --version | head -1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "device", torch.cuda.get_device_name())'
} 2>&1 | tee "$summary"

# The CMake tree compiles while the extension builds and the tests run; the timing loop first, so
# that a test that does not compile costs ctest only. Its parts leave their status in build-gpu/.
build_deadline=$((SECONDS + ${BUILD_TIMEOUT_S:-480}))
within_build_time() {
  local left=$((build_deadline - SECONDS))
  timeout "$((left > 1 ? left : 1))" "$@"
}

cmake_build_tree() {
  local torch_prefix python_path start=$SECONDS
  torch_prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  # An absolute path that keeps a virtual environment's (ctest runs the fixtures elsewhere).
  python_path=$("$PYTHON" -c 'import sys; print(sys.executable)')
  local args=(-DCMAKE_PREFIX_PATH="$torch_prefix" -DTORCHMHA_PYTHON="$python_path"
    -DTORCHMHA_GTEST_SOURCE_DIR="$gtest_source")
  [[ $steps == *ctest* ]] || args+=(-DTORCHMHA_BUILD_TESTS=OFF -DTORCHMHA_BUILD_EXAMPLES=OFF)
  # A CUDA toolkit without NVRTC: the one that came with PyTorch's wheels (nvidia/*/lib).
  local cuda_root=${CUDA_HOME:-/usr/local/cuda} nvrtc site
  if [[ -d $cuda_root ]] && ! compgen -G "$cuda_root/lib64/libnvrtc.so*" >/dev/null; then
    site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    nvrtc=$(find "$site/nvidia" -name 'libnvrtc.so*' ! -name '*builtins*' ! -name '*alt*' \
      2>/dev/null | head -n 1)
    [[ -n $nvrtc ]] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  fi
  local with_tests=$([[ $steps == *ctest* ]] && echo 1)
  # shellcheck disable=SC2086 # TORCHMHA_CMAKE_ARGS is a list of arguments
  if ! within_build_time cmake -S . -B build-gpu -G Ninja "${args[@]}" \
    ${TORCHMHA_CMAKE_ARGS:-}; then
    [[ -n $with_tests ]] || return
    # The tests could not be configured (no GoogleTest, say): the timing loop still can be.
    echo "gpu_check: configuring without the tests, for the timing loop"
    with_tests=
    args+=(-DTORCHMHA_BUILD_TESTS=OFF -DTORCHMHA_BUILD_EXAMPLES=OFF)
    # shellcheck disable=SC2086
    within_build_time cmake -S . -B build-gpu -G Ninja "${args[@]}" ${TORCHMHA_CMAKE_ARGS:-} ||
      return
  fi
  within_build_time cmake --build build-gpu --target torchmha_bench &&
    echo ok >build-gpu/bench.status
  if [[ -n $with_tests ]]; then
    within_build_time cmake --build build-gpu && echo ok >build-gpu/tests.status
  fi
  echo "C++ build (CMake tree, beside the extension's build and pytest): $((SECONDS - start)) s" |
    tee -a "$summary"
}

# ctest once the tree is built and the extension installed (its fixture scripts import torchmha).
run_ctest() {
  while [[ ! -f build-gpu/build.done ]] && ((SECONDS < build_deadline + 60)); do sleep 2; done
  if [[ ! -f build-gpu/tests.status ]]; then
    tail -30 "$OUT/cmake.log" >"$OUT/ctest.log"
    echo "gpu_check: the C++ tests did not build (cmake.log)" | tee -a "$summary"
    return 1
  fi
  echo "gpu_check: ctest -j ${CTEST_JOBS:-6}"
  local rc
  (cd build-gpu && timeout "${CTEST_TIMEOUT_S:-420}" ctest -j "${CTEST_JOBS:-6}" \
    --output-on-failure --timeout 600) >"$OUT/ctest.log" 2>&1
  rc=$?
  ((rc == 124)) && echo "gpu_check: ctest timed out" | tee -a "$OUT/ctest.log"
  echo "ctest: $(grep -E "tests passed" "$OUT/ctest.log" | tail -1)" \
    "($(grep -c -E "\(Skipped\)$" "$OUT/ctest.log") skipped; exit $rc)" | tee -a "$summary"
  grep -E "\((Failed|Timeout|Not Run|SEGFAULT|Subprocess aborted)\)$" "$OUT/ctest.log" |
    tee -a "$summary"
  return "$rc"
}

cmake_pid=
if [[ $steps == *bench* || $steps == *decode* || $steps == *ctest* ]]; then
  mkdir -p build-gpu
  rm -f build-gpu/bench.status build-gpu/tests.status build-gpu/build.done
  {
    cmake_build_tree
    touch build-gpu/build.done
  } >"$OUT/cmake.log" 2>&1 &
  cmake_pid=$!
fi

echo "gpu_check: building the extension (pip install --no-build-isolation .)"
if [[ ${SKIP_INSTALL:-0} == 1 ]]; then
  echo "gpu_check: SKIP_INSTALL=1: using the torchmha installed in $PYTHON" | tee "$OUT/build.log"
elif ! "$PYTHON" -m pip install --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "gpu_check: FAILED to build" | tee -a "$summary"
  exit 1
fi

# A crash here (not an exception) is a build problem; its native stack goes to build.log.
smoke='import torchmha; print(repr(torchmha.cpp.MultiHeadAttention(8, 2)))'
if ! (cd /tmp && "$PYTHON" -c "$smoke") >>"$OUT/build.log" 2>&1; then
  echo "gpu_check: the installed extension crashed on its smoke test" | tee -a "$summary"
  if command -v cuda-gdb >/dev/null; then
    (cd /tmp && timeout 120 cuda-gdb -batch -ex run -ex bt --args "$PYTHON" -c "$smoke") 2>&1 |
      grep -v "Thread" | head -60 >>"$OUT/build.log"
  fi
fi

ctest_pid=
if [[ $steps == *ctest* ]]; then
  run_ctest &
  ctest_pid=$!
fi

if [[ $steps == *tests* ]]; then
  parallel=()
  # Test files spread over processes (two threads each) where pytest-xdist is installed.
  if "$PYTHON" -c 'import xdist' 2>/dev/null; then
    parallel=(-n "$((cores / 2 > 1 ? cores / 2 : 1))" --dist loadfile)
  fi
  echo "gpu_check: pytest ${parallel[*]}"
  OMP_NUM_THREADS=2 timeout "${TEST_TIMEOUT_S:-300}" "$PYTHON" -m pytest tests/python -q -rs \
    "${parallel[@]}" -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
  status=${PIPESTATUS[0]}
  ((status == 124)) && echo "gpu_check: pytest timed out" | tee -a "$OUT/pytest.log"
  echo "pytest: $(tail -1 "$OUT/pytest.log")" >>"$summary"
fi

if [[ -n $ctest_pid ]] && ! wait "$ctest_pid"; then
  status=1
fi

if [[ $steps == *bench* ]]; then
  cpp_bench=build-gpu/torchmha_bench
  wait "$cmake_pid"
  if [[ ! -f build-gpu/bench.status ]]; then
    tail -20 "$OUT/cmake.log"
    echo "gpu_check: the C++ timing loop did not build; benchmarking without it" |
      tee -a "$summary"
    cpp_bench=/nonexistent
  fi
  echo "gpu_check: benchmark"
  if timeout "${BENCH_TIMEOUT_S:-300}" "$PYTHON" scripts/bench/bench.py --device cuda \
      --rounds "${BENCH_ROUNDS:-3}" --target-ms 50 --cpp-bench "$cpp_bench" --out "$OUT/bench" \
      2>&1 | tee "$OUT/bench.log"; then
    grep -A20 "^Goals, as measured" "$OUT/bench.log" >>"$summary"
  else
    echo "gpu_check: benchmark FAILED" | tee -a "$summary"
    status=1
  fi
fi

if [[ $steps == *decode* ]]; then
  # Decoding: bfloat16, batch 1, 8, 32 x cache 1k-32k; eager, CUDA graphs, the C++ graph replay.
  # Results are rewritten after every case, so a timeout keeps the cases measured until then.
  decode_cpp=build-gpu/torchmha_bench
  [[ $steps == *bench* ]] || wait "$cmake_pid"
  if [[ ! -f build-gpu/bench.status ]]; then
    echo "gpu_check: decoding without the C++ step (not built)" | tee -a "$summary"
    decode_cpp=/nonexistent
  fi
  echo "gpu_check: decoding benchmark"
  if timeout "${DECODE_TIMEOUT_S:-240}" "$PYTHON" scripts/bench/bench.py --suite decode \
      --device cuda --rounds "${BENCH_ROUNDS:-3}" --target-ms 20 --cpp-bench "$decode_cpp" \
      --out "$OUT/bench" 2>&1 | tee "$OUT/decode.log"; then
    grep -A12 "^Goals, as measured" "$OUT/decode.log" >>"$summary"
  else
    echo "gpu_check: decoding benchmark FAILED or timed out (decode.log; partial results in" \
      "bench/)" | tee -a "$summary"
    status=1
  fi
fi

if [[ $steps == *profile* ]]; then
  # Kernel tables of the cases furthest from their goals, appended to bench.log.
  for case in "bfloat16 32,128,512,8 inference torchmha_weights,torch_mha_weights" \
    "bfloat16 8,1024,1024,16 inference torchmha_weights,torch_mha_weights" \
    "float32 8,1024,1024,16 training torchmha,torch_mha,torch_mha_weights"; do
    read -r dtype shape mode candidates <<<"$case"
    timeout 120 "$PYTHON" scripts/bench/profile_call.py --device cuda --dtype "$dtype" --shape "$shape" \
      --mode "$mode" --candidates "$candidates" >>"$OUT/bench.log" 2>&1
  done
fi
exit "$status"
