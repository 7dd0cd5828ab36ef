#!/usr/bin/env bash
# The GPU check, for a machine with CUDA and PyTorch already installed (no network needed):
# builds the extension from source against that PyTorch, runs every Python test (the CUDA ones
# included), builds the C++ timing loop and runs the GPU benchmark (scripts/bench.py --device
# cuda), and writes the machine description, logs and results under $OUT.
#
# Usage: OUT=/some/folder scripts/gpu_check.sh [tests] [bench]   (both when none is named)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/build/gpu-check}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONUNBUFFERED=1

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    "device", torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/machine.txt"

echo "gpu_check: building the extension (pip install --no-build-isolation -e .)"
if ! "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "gpu_check: FAILED to build" | tee -a "$OUT/summary.txt"
  exit 1
fi

steps=${*:-tests bench}
status=0

if [[ $steps == *tests* ]]; then
  echo "gpu_check: pytest"
  "$PYTHON" -m pytest tests/python -q -rs --junitxml "$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
  status=${PIPESTATUS[0]}
  tail -1 "$OUT/pytest.log" >>"$OUT/summary.txt"
fi

if [[ $steps == *bench* ]]; then
  echo "gpu_check: building the C++ timing loop (CMake target torchmha_bench)"
  torch_prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')
  if cmake -S . -B build-gpu -G Ninja -DCMAKE_PREFIX_PATH="$torch_prefix" \
      -DTORCHMHA_BUILD_TESTS=OFF -DTORCHMHA_BUILD_EXAMPLES=OFF >"$OUT/cmake.log" 2>&1 &&
    cmake --build build-gpu --target torchmha_bench >>"$OUT/cmake.log" 2>&1; then
    cpp_bench=build-gpu/torchmha_bench
  else
    tail -20 "$OUT/cmake.log"
    echo "gpu_check: the C++ timing loop did not build; benchmarking without it" |
      tee -a "$OUT/summary.txt"
    cpp_bench=/nonexistent
  fi
  echo "gpu_check: benchmark"
  if "$PYTHON" scripts/bench.py --device cuda --rounds "${BENCH_ROUNDS:-3}" --target-ms 50 \
      --cpp-bench "$cpp_bench" --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"; then
    grep -A20 "^Goals, as measured" "$OUT/bench.log" >>"$OUT/summary.txt"
  else
    echo "gpu_check: benchmark FAILED" | tee -a "$OUT/summary.txt"
    status=1
  fi
fi
exit "$status"
