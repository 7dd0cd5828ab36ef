"""The Python-side candidates of the benchmark, all on the same weights and input.

Each candidate is a function that runs one forward (inference) or one forward + backward
(training). The C++ candidates (pure C++ loop, LibTorch's module) live in bench_cpp.cpp.
"""

from dataclasses import dataclass
from typing import Callable, Dict

import torch
from torch import nn

import torchmha
from torchmha.testing import ChapterMultiHeadAttention, pytorch_to_textbook


@dataclass
class Candidate:
    name: str
    description: str
    returns_weights: bool  # compared with PyTorch's need_weights=True path when true
    forward: Callable[[], torch.Tensor]
    modules: tuple


DESCRIPTIONS = {
    "torchmha": "torchmha.MultiHeadAttention, need_weights=False",
    "torchmha_weights": "torchmha.MultiHeadAttention, need_weights=True",
    "torchmha_pybind": "torchmha.cpp.MultiHeadAttention (C++ via pybind11), need_weights=False",
    "torchmha_cpp_loop": "torchmha::MultiHeadAttention from a pure C++ loop, need_weights=false",
    "torchmha_textbook": "torchmha.TextbookMultiHeadAttention (the chapter's API on the op)",
    "torch_mha": "torch.nn.MultiheadAttention, need_weights=False",
    "torch_mha_weights": "torch.nn.MultiheadAttention, need_weights=True (its default)",
    "chapter": "the chapter's MultiHeadAttention (explicit softmax)",
    "libtorch_mha": "LibTorch's torch::nn::MultiheadAttention, need_weights=false",
}


def python_candidates(
    embed_dim: int, num_heads: int, state: Dict[str, torch.Tensor], x: torch.Tensor
) -> Dict[str, Candidate]:
    """Every Python-side candidate, with ``state`` (a torch.nn.MultiheadAttention state dict)
    loaded, on ``x`` of shape (batch, seq, embed) as self-attention."""
    factory = {"device": x.device, "dtype": x.dtype}
    reference = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True, **factory)
    ours = torchmha.MultiHeadAttention(embed_dim, num_heads, batch_first=True, **factory)
    ours_cpp = torchmha.cpp.MultiHeadAttention(embed_dim, num_heads, batch_first=True)
    textbook = torchmha.TextbookMultiHeadAttention(num_heads, embed_dim, dropout=0.0)
    chapter = ChapterMultiHeadAttention(num_heads, embed_dim, dropout=0.0)
    reference.load_state_dict(state)
    ours.load_state_dict(state)
    ours_cpp.load_state_dict(state)
    ours_cpp.to(x.device, x.dtype)
    chapter_state = pytorch_to_textbook(state)
    for module in (textbook, chapter):
        module.load_state_dict(chapter_state)
        module.to(x.device, x.dtype)

    def make(name, returns_weights, forward, module):
        return Candidate(name, DESCRIPTIONS[name], returns_weights, forward, (module,))

    return {
        c.name: c
        for c in (
            make("torchmha", False, lambda: ours(x, x, x, need_weights=False)[0], ours),
            make("torchmha_weights", True, lambda: ours(x, x, x)[0], ours),
            make(
                "torchmha_pybind", False, lambda: ours_cpp(x, x, x, need_weights=False)[0], ours_cpp
            ),
            make("torchmha_textbook", True, lambda: textbook(x, x, x), textbook),
            make("torch_mha", False, lambda: reference(x, x, x, need_weights=False)[0], reference),
            make("torch_mha_weights", True, lambda: reference(x, x, x)[0], reference),
            make("chapter", True, lambda: chapter(x, x, x), chapter),
        )
    }


def step_function(candidate, training: bool):
    """One inference forward, or one training step (forward, backward of the sum)."""
    if not training:
        return candidate.forward

    def step():
        candidate.forward().float().sum().backward()

    return step
