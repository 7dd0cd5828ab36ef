#!/usr/bin/env bash
# Sets up what is missing, builds (the C++ timing loop included), and runs the benchmark:
# scripts/bench.sh [scripts/bench/bench.py options], e.g. --device cuda or --shapes 8,512,512,8.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/build.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/bench/requirements.txt
.venv/bin/python scripts/bench/bench.py "$@"
