"""Builds the torchmha Python package and its C++ extension from the csrc/ sources."""

import os
import warnings
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
# The PyTorch releases the whole test suite has passed on (tests/README.md, "Tested PyTorch
# releases"); CMakeLists.txt keeps the same list.
TESTED_TORCH_RELEASES = ("2.11", "2.13", "2.14", "2.15")
TORCH_RELEASE = ".".join(torch.__version__.split("+")[0].split(".")[:2])
if TORCH_RELEASE not in TESTED_TORCH_RELEASES:
    warnings.warn(
        f"torchmha: building against PyTorch {torch.__version__}, which it has not been tested "
        f"with (tested: {', '.join(TESTED_TORCH_RELEASES)})",
        stacklevel=1,
    )
LIBRARY_SOURCES = [
    "csrc/ops.cpp",
    "csrc/composite/argument_checks.cpp",
    "csrc/composite/attention.cpp",
    "csrc/composite/blocked_attention.cpp",
    "csrc/composite/cache_step.cpp",
    "csrc/composite/head_mean_softmax.cpp",
    "csrc/composite/masks.cpp",
    "csrc/composite/multi_head_attention.cpp",
    "csrc/composite/rotary.cpp",
    "csrc/composite/stream_capture.cpp",
    "csrc/module.cpp",
    "csrc/kv_cache.cpp",
    "csrc/textbook.cpp",
    "csrc/serialize.cpp",
]
# Kernels of their own for CUDA, built where this PyTorch has CUDA and nvcc is found
# (TORCHMHA_CUDA=0 leaves them out; the op then composes ATen ops on CUDA too).
CUDA_SOURCES = ["csrc/cuda/head_mean_softmax.cu", "csrc/cuda/stream_capture.cpp"]
WITH_CUDA = (
    torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("TORCHMHA_CUDA", "1") != "0"
)
Extension = CUDAExtension if WITH_CUDA else CppExtension

setup(
    name="torchmha",
    version="0.1.0",
    description="Multi-head attention as one C++ op for PyTorch and LibTorch",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    package_dir={"": "python"},
    packages=["torchmha"],
    ext_modules=[
        Extension(
            "torchmha._C",
            [*LIBRARY_SOURCES, *(CUDA_SOURCES if WITH_CUDA else []), "csrc/python/bindings.cpp"],
            include_dirs=[str(ROOT / "csrc" / "include")],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    # A build runs with the PyTorch it was built against; older releases are not tested.
    install_requires=[f"torch>={TESTED_TORCH_RELEASES[0]}"],
    python_requires=">=3.9",
)
