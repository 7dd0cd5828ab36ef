"""Builds the torchmha Python package and its C++ extension from the csrc/ sources."""

import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
LIBRARY_SOURCES = [
    "csrc/ops.cpp",
    "csrc/composite/argument_checks.cpp",
    "csrc/composite/attention.cpp",
    "csrc/composite/blocked_attention.cpp",
    "csrc/composite/head_mean_softmax.cpp",
    "csrc/composite/masks.cpp",
    "csrc/composite/multi_head_attention.cpp",
    "csrc/module.cpp",
    "csrc/textbook.cpp",
    "csrc/serialize.cpp",
]
# Kernels of their own for CUDA, built where this PyTorch has CUDA and nvcc is found
# (TORCHMHA_CUDA=0 leaves them out; the op then composes ATen ops on CUDA too).
CUDA_SOURCES = ["csrc/cuda/head_mean_softmax.cu"]
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
    install_requires=["torch>=2.5"],
    python_requires=">=3.9",
)
