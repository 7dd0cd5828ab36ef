#!/usr/bin/env bash
# The test command: sets up what is missing, builds, lints, then runs every C++ and Python test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/build.sh
scripts/lint.sh
scripts/check_packaging.sh

echo "test: GoogleTest (ctest)"
(cd build && ctest --output-on-failure -j "$(nproc)")

echo "test: pytest"
# pytest exits 5 when it collects no test; set -e turns that into a failure too.
.venv/bin/python -m pytest tests/python -q
