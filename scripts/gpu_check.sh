#!/usr/bin/env bash
# The GPU check, for a machine with CUDA and PyTorch already installed (no network needed):
# builds the extension from source against that PyTorch, runs every Python test (the CUDA ones
# included), builds the C++ timing loop (in the background, meanwhile) and runs the GPU
# benchmark (scripts/bench/bench.py --device cuda), then profiles the cases furthest from their goals
# (scripts/bench/profile_call.py, appended to bench.log).
#
# Usage: OUT=/some/folder scripts/gpu_check.sh [tests] [bench] [decode] [profile]   (all when none
# is named)
# TORCHMHA_COMMIT=<commit> labels the results where the copy's .git is not the tree's.
# Writes at most twelve files under $OUT: summary.txt (machine, pass count, goals), build.log,
# cmake.log, pytest.log, bench.log, bench/cuda-<card>.{json,md,png}, and for the decoding suite
# decode.log and bench/cuda-<card>-decode.{json,md,png}.
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
steps=${*:-tests bench decode profile}
status=0

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  echo "${TORCHMHA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "commit unknown")}"
  "$CXX" --version | head -1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "device", torch.cuda.get_device_name())'
} 2>&1 | tee "$summary"

if [[ $steps == *bench* || $steps == *decode* ]]; then
  # Compiles while the extension builds and the tests run; waited for before the benchmark.
  torch_prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  (cmake -S . -B build-gpu -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" \
    -DTORCHMHA_BUILD_TESTS=OFF -DTORCHMHA_BUILD_EXAMPLES=OFF &&
    cmake --build build-gpu --target torchmha_bench) >"$OUT/cmake.log" 2>&1 &
  cmake_pid=$!
fi

echo "gpu_check: building the extension (pip install --no-build-isolation .)"
if ! "$PYTHON" -m pip install --no-build-isolation --no-deps . >"$OUT/build.log" 2>&1; then
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

if [[ $steps == *bench* ]]; then
  cpp_bench=build-gpu/torchmha_bench
  if ! wait "$cmake_pid"; then
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
  if [[ $steps != *bench* ]] && ! wait "$cmake_pid"; then
    decode_cpp=/nonexistent
  fi
  [[ -x $decode_cpp ]] || echo "gpu_check: decoding without the C++ step (not built)" |
    tee -a "$summary"
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
