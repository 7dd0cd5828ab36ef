#!/usr/bin/env bash
# The GPU check, for a machine with CUDA and PyTorch already installed (no network needed):
# builds the extension from source against that PyTorch, runs every Python test (the CUDA ones
# included) and writes the machine description, logs and results under $OUT.
#
# Usage: OUT=/some/folder scripts/gpu_check.sh
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

echo "gpu_check: pytest"
"$PYTHON" -m pytest tests/python -q -rs --junitxml "$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}
tail -1 "$OUT/pytest.log" >>"$OUT/summary.txt"
exit "$status"
