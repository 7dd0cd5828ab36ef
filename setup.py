"""Builds the torchmha Python package and its C++ extension from the csrc/ sources."""

from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent
LIBRARY_SOURCES = [
    "csrc/ops.cpp",
    "csrc/composite/argument_checks.cpp",
    "csrc/composite/attention.cpp",
    "csrc/composite/blocked_attention.cpp",
    "csrc/composite/masks.cpp",
    "csrc/composite/multi_head_attention.cpp",
    "csrc/module.cpp",
    "csrc/textbook.cpp",
    "csrc/serialize.cpp",
]

setup(
    name="torchmha",
    version="0.1.0",
    description="Multi-head attention as one C++ op for PyTorch and LibTorch",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    package_dir={"": "python"},
    packages=["torchmha"],
    ext_modules=[
        CppExtension(
            "torchmha._C",
            [*LIBRARY_SOURCES, "csrc/python/bindings.cpp"],
            include_dirs=[str(ROOT / "csrc" / "include")],
            extra_compile_args={"cxx": ["-O3"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch>=2.5"],
    python_requires=">=3.9",
)
