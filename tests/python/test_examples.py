"""The examples a user reads and runs (``scripts/examples/``) run and agree with PyTorch."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPP_DEMO = os.path.join(ROOT, "build", "torchmha_demo")


def test_demo_runs_pytorch_python_and_cpp_on_the_same_weights() -> None:
    """``scripts/run.sh``'s demo: PyTorch's module, torchmha from Python and the C++ program (which
    loads the weights PyTorch's module saved) agree within float32 tolerance."""
    assert os.access(CPP_DEMO, os.X_OK), f"{CPP_DEMO} is missing: scripts/build.sh builds it"
    command = [sys.executable, os.path.join(ROOT, "scripts", "examples", "demo.py"),
               "--cpp-demo", CPP_DEMO, "--batch", "2", "--seq", "16", "--embed", "32",
               "--heads", "4", "--repeats", "2"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every difference is within" in result.stdout
    assert "torchmha (C++ program)" in result.stdout
