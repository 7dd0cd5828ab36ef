"""torchmha: multi-head attention as one C++ op, for PyTorch and LibTorch alike.

Importing this package loads the C++ extension, which registers
``torch.ops.torchmha.multi_head_attention``.
"""

import torch  # noqa: F401  (loads libtorch and libc10, which the extension links against)

from torchmha import (  # noqa: E402
    _C,  # noqa: F401  (registers the op)
    cpp,
)
from torchmha._compile_cache import tag_compile_caches
from torchmha.conversion import load_separate_projections, separate_projections_state_dict
from torchmha.kv_cache import KVCache
from torchmha.modules import MultiHeadAttention
from torchmha.ops import multi_head_attention
from torchmha.serialization import save_state_dict
from torchmha.textbook import TextbookMultiHeadAttention

# PyTorch's spelling, so `from torchmha import MultiheadAttention` swaps one word of an import.
MultiheadAttention = MultiHeadAttention

__version__ = _C.version()

# torch.compile's caches must not hand this build another build's graphs of the op.
tag_compile_caches(_C.__file__)


def __getattr__(name: str):
    # torchmha.parallel imports torch.distributed.tensor, which plain use does not need.
    if name == "parallel":
        import importlib

        return importlib.import_module("torchmha.parallel")
    raise AttributeError(f"module 'torchmha' has no attribute {name!r}")


__all__ = [
    "KVCache",
    "MultiHeadAttention",
    "MultiheadAttention",
    "TextbookMultiHeadAttention",
    "cpp",
    "load_separate_projections",
    "multi_head_attention",
    "parallel",
    "save_state_dict",
    "separate_projections_state_dict",
]
