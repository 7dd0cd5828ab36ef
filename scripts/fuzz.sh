#!/usr/bin/env bash
# The long property/fuzz run: random (not CI's fixed) hypothesis examples of valid configurations
# against torch.nn.MultiheadAttention and of invalid ones that must raise a clear error.
#
# Usage: scripts/fuzz.sh [examples per test]   (default 5000: about 2 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

export TORCHMHA_FUZZ_EXAMPLES=${1:-5000}
.venv/bin/python -m pytest tests/python/test_properties.py -q -p no:cacheprovider \
  --hypothesis-show-statistics
