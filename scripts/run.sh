#!/usr/bin/env bash
# The first command: sets up what is missing, builds only what the demo needs (the Python
# extension and the C++ demo program, no tests), and runs scripts/examples/demo.py: PyTorch,
# torchmha from Python and torchmha from C++ on the same inputs and weights.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/build.sh torchmha_demo
.venv/bin/python scripts/examples/demo.py "$@"
