#!/usr/bin/env bash
# Packaging check: builds a wheel with `pip wheel --no-build-isolation .` (the build that
# `pip install --no-build-isolation .` runs), installs it into a fresh virtual environment with
# only torch beside it, and checks in a fresh process, outside the source tree, that
# `import torchmha` registers the op and computes what torch.nn.MultiheadAttention computes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dist=$root/build/dist
fresh=$root/build/packaging-venv
[[ -d /usr/lib/ccache ]] && export PATH=/usr/lib/ccache:$PATH CCACHE_NOHASHDIR=1 CCACHE_BASEDIR=$root

rm -rf "$dist" "$fresh"
echo "packaging: building the wheel"
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-build-isolation --no-deps \
  -w "$dist" .
wheel=$(ls "$dist"/torchmha-*.whl)

echo "packaging: installing $(basename "$wheel") into a fresh virtual environment"
python3 -m venv "$fresh"
torch_requirement=$(grep '^torch==' scripts/requirements-dev.txt)
"$fresh/bin/python" -m pip install -q --disable-pip-version-check "$torch_requirement" "$wheel"

cd "$(mktemp -d)"
"$fresh/bin/python" - <<'PY'
import torch

import torchmha

assert torchmha.__file__.find("site-packages") > 0, torchmha.__file__
assert hasattr(torch.ops.torchmha, "multi_head_attention")
torch.manual_seed(0)
reference = torch.nn.MultiheadAttention(16, 4).eval()
ours = torchmha.MultiHeadAttention(16, 4).eval()
ours.load_state_dict(reference.state_dict())
x = torch.randn(5, 2, 16)
difference = (ours(x, x, x)[0] - reference(x, x, x)[0]).abs().max().item()
assert difference < 1e-5, difference
print(f"packaging: the installed wheel registers the op; max |diff| to PyTorch {difference:.1e}")
PY
