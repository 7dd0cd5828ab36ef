#!/usr/bin/env bash
# Sets up what is missing, builds, and runs the demo: PyTorch, torchmha from Python and from C++
# on the same inputs and weights.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/build.sh
.venv/bin/python scripts/demo.py "$@"
