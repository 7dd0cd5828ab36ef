#!/usr/bin/env bash
# The test command: sets up what is missing, builds, lints, checks the packaging, then runs every
# C++ (ctest) and Python (pytest) test. Prints how long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."

step() {
  local started=$SECONDS
  "$@"
  echo "test: '$*' took $((SECONDS - started)) s"
}

step scripts/setup.sh
step scripts/build.sh
step scripts/lint.sh
step scripts/check_packaging.sh

# One intra-op thread per test process: the parallelism is ctest's and pytest's processes, one
# per core (idle OpenMP threads of tiny tensors spin against each other on a small machine).
# Counted first: nproc itself answers OMP_NUM_THREADS.
workers=$(nproc)
export OMP_NUM_THREADS=1

echo "test: GoogleTest and the interchange tests (ctest)"
step bash -c "cd build && ctest --output-on-failure -j $workers"

echo "test: pytest ($workers processes, a test file to each)"
# pytest exits 5 when it collects no test; set -e turns that into a failure too.
.venv/bin/python -m pytest tests/python -q -n "$workers" --dist loadfile
