"""gradcheck and gradgradcheck through the CPU's blocked ``need_weights=True`` path.

The blocked path starts where the scores outgrow one block (8 MiB), far beyond what gradcheck can
afford; a subprocess with ``TORCHMHA_SCORE_BLOCK_BYTES=96`` (a few query rows per block) runs
``blocked_gradcheck_worker.py`` on small float64 inputs instead: every block boundary, masks with
fully masked rows, weights averaged and per head, and losses through the output, the weights, or
both.
"""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("case", ["no_mask", "masks", "per_head"])
def test_blocked_gradcheck(case):
    environment = {**os.environ, "TORCHMHA_SCORE_BLOCK_BYTES": "96"}
    script = os.path.join(HERE, "blocked_gradcheck_worker.py")
    result = subprocess.run(
        [sys.executable, script, case], capture_output=True, text=True, env=environment, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "blocks per batch entry: " in result.stdout
    blocks = int(result.stdout.split("blocks per batch entry: ")[1].split()[0])
    assert blocks >= 3, result.stdout
