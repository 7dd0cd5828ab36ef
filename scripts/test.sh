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

echo "test: GoogleTest and the interchange tests (ctest)"
step bash -c 'cd build && ctest --output-on-failure -j "$(nproc)"'

echo "test: pytest"
# pytest exits 5 when it collects no test; set -e turns that into a failure too.
.venv/bin/python -m pytest tests/python -q
