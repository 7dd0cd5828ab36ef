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


# Grouped-query attention with rotary embeddings (causal self-attention, no biases, as in Llama).
GQA_DESCRIPTIONS = {
    "torchmha": "torchmha.MultiHeadAttention(num_kv_heads, rope_theta), need_weights=False",
    "sdpa_gqa": "Python: nn.Linear q/k/v/o, rotate-half rotary, F.scaled_dot_product_attention("
    "enable_gqa=True)",
    "llama_eager": "transformers' LlamaAttention, attn_implementation='eager' (repeat_kv, softmax)",
    "llama_sdpa": "transformers' LlamaAttention, attn_implementation='sdpa'",
}
GQA_PEERS = ("sdpa_gqa", "llama_eager", "llama_sdpa")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_tables(seq: int, head_dim: int, theta: float, like: torch.Tensor):
    """cos and sin of (seq, head_dim) for positions 0..seq-1, rotate-half layout, float32 math."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=like.device, dtype=torch.float32) / head_dim
    )
    angles = torch.arange(seq, device=like.device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(like.dtype), angles.sin().to(like.dtype)


class SdpaGroupedQueryAttention(nn.Module):
    """The attention block written in Python on SDPA: what a user would write without torchmha.
    Batch-first self-attention; the rotary tables are computed on every call, as torchmha does."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, rope_theta: float):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.rope_theta = rope_theta
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=False)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, embed = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary_tables(seq, self.head_dim, self.rope_theta, x)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, embed))


def _llama_config(embed_dim, num_heads, num_kv_heads, rope_theta, seq, implementation):
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=embed_dim,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=4 * embed_dim,
        num_hidden_layers=1,
        vocab_size=16,
        max_position_embeddings=max(seq, 1),
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        attention_bias=False,
        attention_dropout=0.0,
    )
    config._attn_implementation = implementation
    return config


def _llama_candidate(
    name, implementation, embed_dim, num_heads, num_kv_heads, rope_theta, x, state
):
    """LlamaAttention with ``state`` (q/k/v/o_proj weights), its rotary embedding computed per call
    (a model computes it once per forward for all layers; here it is the block's share), and the
    causal mask a Llama model hands each implementation: None for SDPA (is_causal), an additive
    (1, 1, L, L) float mask for eager, built once outside the timed call as the model does."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    seq = x.shape[1]
    config = _llama_config(embed_dim, num_heads, num_kv_heads, rope_theta, seq, implementation)
    attention = LlamaAttention(config, layer_idx=0).to(x.device, x.dtype)
    attention.load_state_dict(state)
    rotary = LlamaRotaryEmbedding(config).to(x.device)
    position_ids = torch.arange(seq, device=x.device)[None]
    mask = None
    if implementation == "eager":
        blocked = torch.full((seq, seq), torch.finfo(x.dtype).min, device=x.device, dtype=x.dtype)
        mask = blocked.triu(1)[None, None]

    def forward():
        position_embeddings = rotary(x, position_ids)
        return attention(x, position_embeddings=position_embeddings, attention_mask=mask)[0]

    return Candidate(name, GQA_DESCRIPTIONS[name], False, forward, (attention, rotary))


def _load_separate_projections(module, state):
    """q/k/v/o_proj weights into a torchmha module: torchmha's own conversion where it exists,
    else the same packing by hand (rows [q | k | v] of in_proj_weight)."""
    if hasattr(torchmha, "load_separate_projections"):
        torchmha.load_separate_projections(module, state)
        return
    packed = torch.cat([state["q_proj.weight"], state["k_proj.weight"], state["v_proj.weight"]])
    module.load_state_dict({"in_proj_weight": packed, "out_proj.weight": state["o_proj.weight"]})


def gqa_candidates(
    embed_dim: int, num_heads: int, num_kv_heads: int, rope_theta: float, x: torch.Tensor
) -> Dict[str, Candidate]:
    """torchmha and its grouped-query peers on the same random weights (a fresh
    SdpaGroupedQueryAttention's, in q/k/v/o_proj layout) and on ``x`` (batch, seq, embed), causal
    self-attention with rotary embeddings. The Llama peers are left out when transformers is not
    installed."""
    factory = {"device": x.device, "dtype": x.dtype}
    python_sdpa = SdpaGroupedQueryAttention(embed_dim, num_heads, num_kv_heads, rope_theta)
    python_sdpa.to(**factory)
    state = python_sdpa.state_dict()
    ours = torchmha.MultiHeadAttention(
        embed_dim,
        num_heads,
        bias=False,
        batch_first=True,
        num_kv_heads=num_kv_heads,
        rope_theta=rope_theta,
        **factory,
    )
    _load_separate_projections(ours, state)

    def make(name, forward, module):
        return Candidate(name, GQA_DESCRIPTIONS[name], False, forward, (module,))

    candidates = [
        make("torchmha", lambda: ours(x, x, x, need_weights=False, is_causal=True)[0], ours),
        make("sdpa_gqa", lambda: python_sdpa(x), python_sdpa),
    ]
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("bench: transformers is not installed; the LlamaAttention peers are left out")
    else:
        for name, implementation in (("llama_eager", "eager"), ("llama_sdpa", "sdpa")):
            candidates.append(
                _llama_candidate(
                    name, implementation, embed_dim, num_heads, num_kv_heads, rope_theta, x, state
                )
            )
    return {c.name: c for c in candidates}
