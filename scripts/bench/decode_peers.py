"""The candidates of the decoding suite (``bench.py --suite decode``): one generated token of
grouped-query causal self-attention with rotary embeddings, per step function.

Every cached candidate holds the same keys and values in the first ``prompt`` slots of its own
static cache of ``max_seq_len`` slots (written there directly: a prefill through the candidates
would cost minutes and, at the GPU's long caches, more memory than the step) and runs the step at
cache length ``prompt`` each time (its length rewound before the call), so every timed call does
the same work: project the new token, rotate, write its key and value, attend over all
``max_seq_len`` slots under a mask, project out. ``torch.nn.MultiheadAttention`` has no cache: it
recomputes the prompt and the new token each step (causal, full sequence).

On CUDA the compiled candidates use ``mode="reduce-overhead"`` (CUDA graphs), their caches marked
as static addresses (as transformers' StaticCache marks its own), so a replay reads the cache in
place instead of copying it into the graph's inputs.
"""

import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import timing
import torch
from peers import _llama_config, rotary_tables, rotate_half
from torch import nn

import torchmha

DECODE_DESCRIPTIONS = {
    "torchmha": "torchmha.MultiHeadAttention(num_kv_heads, rope_theta) with torchmha.KVCache, "
    "need_weights=False, is_causal=True",
    "torchmha_compiled": "the same under torch.compile(fullgraph=True) (on CUDA with "
    'mode="reduce-overhead": CUDA graphs)',
    "torchmha_cpp": "torchmha::MultiHeadAttention with torchmha::KVCache from a C++ loop "
    "(scripts/bench/bench_cpp.cpp), eager",
    "torchmha_cpp_graph": "the same C++ step captured once into an at::cuda::CUDAGraph and "
    "replayed per token (CUDA only)",
    "torch_mha_recompute": "torch.nn.MultiheadAttention (16 kv heads, no rotary: what it offers) "
    "over prompt + new token each step, causal, need_weights=False",
    "sdpa_cache": "Python: nn.Linear q/k/v/o, rotate-half rotary from precomputed tables, static "
    "cache written by index_copy_, F.scaled_dot_product_attention(mask, enable_gqa=True) "
    "(the gpt-fast / torchtune design), eager",
    "sdpa_cache_compiled": "the same under torch.compile(fullgraph=True) (on CUDA with "
    'mode="reduce-overhead": CUDA graphs)',
    "llama_static": "transformers' LlamaAttention (sdpa) with StaticCache",
}
DECODE_PEERS = ("torch_mha_recompute", "sdpa_cache", "sdpa_cache_compiled", "llama_static")


@dataclass
class DecodeCase:
    """One decoding configuration and the inputs every candidate shares."""

    batch: int
    prompt: int
    embed: int
    heads: int
    kv_heads: int
    max_seq_len: int
    rope_theta: float
    # (batch, kv_heads, up to 256, head_dim) float32 on the CPU: tiled over the prompt's slots, the
    # cached keys and values (small enough to hand to the C++ program as a file).
    key_block: torch.Tensor
    value_block: torch.Tensor
    new_token: torch.Tensor  # (batch, 1, embed), float32 on the CPU: the token of the timed step
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def head_dim(self) -> int:
        return self.embed // self.heads

    def token(self) -> torch.Tensor:
        return self.new_token.to(self.device, self.dtype)

    def cached(self, block: torch.Tensor) -> torch.Tensor:
        """The first ``prompt`` slots' keys or values: ``block`` repeated along the slots."""
        repeats = -(-self.prompt // block.shape[2])
        tiled = block.to(self.device, self.dtype).repeat(1, 1, repeats, 1)
        return tiled[:, :, : self.prompt]

    def fill(self, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
        """Writes the cached keys and values into a (batch, kv_heads, max_seq_len, head_dim)
        cache's first ``prompt`` slots."""
        # Inference mode: a StaticCache allocates its tensors in the first (inference) step.
        with torch.inference_mode():
            key_cache[:, :, : self.prompt] = self.cached(self.key_block)
            value_cache[:, :, : self.prompt] = self.cached(self.value_block)


def new_decode_case(
    batch, prompt, embed, heads, kv_heads, room, rope_theta, device, dtype
) -> DecodeCase:
    """A case's random cache contents and new token, drawn after the weights (decode_candidates
    draws those first from the same seed, so every case with the same sizes has the same ones)."""
    head_dim = embed // heads
    block = min(prompt, 256)
    return DecodeCase(
        batch,
        prompt,
        embed,
        heads,
        kv_heads,
        max_seq_len=prompt + room,
        rope_theta=rope_theta,
        key_block=torch.randn(batch, kv_heads, block, head_dim),
        value_block=torch.randn(batch, kv_heads, block, head_dim),
        new_token=torch.randn(batch, 1, embed),
        device=torch.device(device),
        dtype=dtype,
    )


def _compile(module: nn.Module, case: DecodeCase, static_tensors) -> Callable:
    """``module`` under torch.compile(fullgraph=True): on CUDA with CUDA graphs, the tensors it
    updates or reads in place marked as static addresses (else each replay copies them in)."""
    if case.device.type != "cuda":
        return torch.compile(module, fullgraph=True)
    for tensor in static_tensors:
        # Unguarded: the next case's new caches need a new recording, not a recompilation.
        torch._dynamo.mark_static_address(tensor, guard=False)
    compiled = torch.compile(module, fullgraph=True, mode="reduce-overhead")

    def forward(*args, **kwargs):
        # A new generation step: the outputs of the previous replay may be overwritten.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return forward


@dataclass
class DecodeCandidate:
    name: str
    description: str
    forward: Callable[[], torch.Tensor]  # one decoding step at cache length `prompt`
    modules: tuple
    # Same function as torchmha's step (same weights and attention), so outputs are compared.
    same_function: bool = True


class SdpaStaticCacheAttention(nn.Module):
    """Cached grouped-query attention as gpt-fast and torchtune write it: a static cache written
    by ``index_copy_`` at ``input_pos``, rotary tables and the causal mask precomputed for every
    slot and indexed by ``input_pos``, SDPA over all ``max_seq_len`` slots with that mask."""

    def __init__(self, case: DecodeCase):
        super().__init__()
        self.num_heads, self.num_kv_heads = case.heads, case.kv_heads
        self.head_dim = case.head_dim
        kv_dim = case.kv_heads * self.head_dim
        on = {"device": case.device, "dtype": case.dtype}
        self.q_proj = nn.Linear(case.embed, case.embed, bias=False, **on)
        self.k_proj = nn.Linear(case.embed, kv_dim, bias=False, **on)
        self.v_proj = nn.Linear(case.embed, kv_dim, bias=False, **on)
        self.o_proj = nn.Linear(case.embed, case.embed, bias=False, **on)
        shape = (case.batch, case.kv_heads, case.max_seq_len, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, **on), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, **on), persistent=False)
        cos, sin = rotary_tables(case.max_seq_len, self.head_dim, case.rope_theta, self.k_cache)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        slots = case.max_seq_len
        causal = torch.ones(slots, slots, dtype=torch.bool, device=case.device).tril()
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        batch, seq, embed = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        mask = self.causal_mask[None, None, input_pos]
        out = nn.functional.scaled_dot_product_attention(
            q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, embed))


def torchmha_module(
    case: DecodeCase, state: Dict[str, torch.Tensor]
) -> torchmha.MultiHeadAttention:
    """torchmha's module of the case (float32, CPU) on the q/k/v/o_proj weights ``state``."""
    ours = torchmha.MultiHeadAttention(
        case.embed,
        case.heads,
        bias=False,
        batch_first=True,
        num_kv_heads=case.kv_heads,
        rope_theta=case.rope_theta,
    )
    torchmha.load_separate_projections(ours, state)
    return ours


def _torchmha_candidate(
    case: DecodeCase, state: Dict[str, torch.Tensor], name: str
) -> DecodeCandidate:
    """torchmha with its own KVCache, eager or (``torchmha_compiled``) the module compiled."""
    ours = torchmha_module(case, state)
    ours.to(case.device, case.dtype)
    cache = ours.new_kv_cache(case.batch, case.max_seq_len)
    case.fill(cache.key, cache.value)
    static = (cache.key, cache.value, cache.seq_lens)
    forward = _compile(ours, case, static) if name == "torchmha_compiled" else ours
    x = case.token()

    def step():
        cache.seq_lens.fill_(case.prompt)  # rewind: every call decodes the same position
        return forward(x, x, x, kv_cache=cache, is_causal=True, need_weights=False)[0]

    return DecodeCandidate(name, DECODE_DESCRIPTIONS[name], step, (ours, cache))


def _torch_mha_candidate(case: DecodeCase) -> DecodeCandidate:
    on = {"device": case.device, "dtype": case.dtype}
    reference = nn.MultiheadAttention(case.embed, case.heads, bias=False, batch_first=True, **on)
    prompt_tokens = torch.randn(case.batch, case.prompt, case.embed, **on)
    sequence = torch.cat((prompt_tokens, case.token()), dim=1)
    length = sequence.shape[1]
    causal = torch.full((length, length), float("-inf"), **on).triu(1)

    def step():
        out = reference(
            sequence, sequence, sequence, attn_mask=causal, is_causal=True, need_weights=False
        )[0]
        return out[:, -1:]

    return DecodeCandidate(
        "torch_mha_recompute",
        DECODE_DESCRIPTIONS["torch_mha_recompute"],
        step,
        (reference,),
        same_function=False,
    )


def _sdpa_candidates(case: DecodeCase, state: Dict[str, torch.Tensor], compiled: bool):
    """The eager Python cache and, with ``compiled``, a second one under torch.compile (each its
    own module and cache, so neither sees the other's writes)."""
    candidates = []
    for name in ("sdpa_cache", "sdpa_cache_compiled") if compiled else ("sdpa_cache",):
        module = SdpaStaticCacheAttention(case)
        module.load_state_dict(state)
        case.fill(module.k_cache, module.v_cache)
        if name.endswith("compiled"):
            forward = _compile(module, case, [b for b in module.buffers()])
        else:
            forward = module
        input_pos = torch.tensor([case.prompt], device=case.device)
        token = case.token()

        def step(forward=forward, input_pos=input_pos, token=token):
            return forward(token, input_pos)

        candidates.append(DecodeCandidate(name, DECODE_DESCRIPTIONS[name], step, (module,)))
    return candidates


def _llama_candidate(case: DecodeCase, state: Dict[str, torch.Tensor]) -> DecodeCandidate:
    """LlamaAttention (sdpa) with a StaticCache of ``max_seq_len`` slots, its rotary embedding
    computed per call, and the mask a Llama model builds once per step for all its layers (here
    outside the timed call): a bool (batch, 1, 1, max_seq_len), true up to the new position."""
    from transformers import StaticCache
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = _llama_config(
        case.embed, case.heads, case.kv_heads, case.rope_theta, case.max_seq_len, "sdpa"
    )
    attention = LlamaAttention(config, layer_idx=0)
    attention.load_state_dict(state)
    attention.to(case.device, case.dtype)
    rotary = LlamaRotaryEmbedding(config).to(case.device)
    cache = StaticCache(config=config, max_cache_len=case.max_seq_len)
    slots = torch.arange(case.max_seq_len, device=case.device)
    layer = cache.layers[0]
    position = torch.tensor([case.prompt], device=case.device)
    step_mask = (slots <= case.prompt)[None, None, None].expand(case.batch, 1, 1, -1)
    token = case.token()

    def step():
        layer.cumulative_length.fill_(case.prompt)  # rewind
        embeddings = rotary(token, position[None].expand(case.batch, -1))
        return attention(
            token, position_embeddings=embeddings, attention_mask=step_mask, cache=cache
        )[0]

    with torch.inference_mode():
        step()  # the cache allocates its keys and values on its first update
    case.fill(layer.keys, layer.values)

    return DecodeCandidate(
        "llama_static", DECODE_DESCRIPTIONS["llama_static"], step, (attention, rotary)
    )


def random_weights(embed: int, heads: int, kv_heads: int) -> Dict[str, torch.Tensor]:
    """Random q/k/v/o_proj weights (nn.Linear's initialisation), float32 on the CPU."""
    kv_dim = kv_heads * (embed // heads)
    shapes = {"q_proj": embed, "k_proj": kv_dim, "v_proj": kv_dim, "o_proj": embed}
    return {
        f"{name}.weight": nn.Linear(embed, rows, bias=False).weight.detach()
        for name, rows in shapes.items()
    }


def torchmha_state_dict(case: DecodeCase, state: Dict[str, torch.Tensor]) -> dict:
    """torchmha's state dict (float32, CPU) on the q/k/v/o_proj weights: what C++ loads."""
    ours = torchmha_module(case, state)
    return dict(ours.state_dict())


def decode_candidates(
    case: DecodeCase, wanted, state: Dict[str, torch.Tensor]
) -> Dict[str, DecodeCandidate]:
    """Every Python candidate named in ``wanted`` on the q/k/v/o_proj weights ``state``
    (``random_weights``), each cache holding the case's keys and values. The Llama peer is left
    out when transformers is missing."""
    candidates = []
    for name in ("torchmha", "torchmha_compiled"):
        if name in wanted:
            candidates.append(_torchmha_candidate(case, state, name))
    if "torch_mha_recompute" in wanted:
        candidates.append(_torch_mha_candidate(case))
    if "sdpa_cache" in wanted or "sdpa_cache_compiled" in wanted:
        for candidate in _sdpa_candidates(case, state, "sdpa_cache_compiled" in wanted):
            if candidate.name in wanted:
                candidates.append(candidate)
    if "llama_static" in wanted:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("bench: transformers is not installed; the LlamaAttention peer is left out")
        else:
            candidates.append(_llama_candidate(case, state))
    return {c.name: c for c in candidates}


def step_bytes(case: DecodeCase) -> Dict[str, int]:
    """Bytes a cached step must read: the keys and values of every cache slot (attention runs over
    all ``max_seq_len`` of them) and the four projection weights, in the case's dtype."""
    itemsize = case.dtype.itemsize
    kv_dim = case.kv_heads * case.head_dim
    cache = 2 * case.batch * case.max_seq_len * kv_dim * itemsize
    weights = (2 * case.embed * case.embed + 2 * case.embed * kv_dim) * itemsize
    return {"cache": cache, "weights": weights, "total": cache + weights}


def step_flops(case: DecodeCase) -> int:
    """A cached step's arithmetic: the four projections of one token and the two attention
    products over every slot, two FLOPs per multiply-add."""
    kv_dim = case.kv_heads * case.head_dim
    projections = 2 * case.batch * (2 * case.embed * case.embed + 2 * case.embed * kv_dim)
    attention = 4 * case.batch * case.heads * case.max_seq_len * case.head_dim
    return projections + attention


def memory_bandwidth(
    rounds: int = 5, megabytes: int = 256, device: Optional[torch.device] = None
) -> Optional[float]:
    """The device's copy bandwidth in bytes/s: a large tensor copied into another (bytes read
    plus bytes written over the time), best of ``rounds``; both tensors faulted in first. On a GPU
    a device-to-device copy timed by CUDA events, ten copies back to back per round."""
    device = device or torch.device("cpu")
    source = torch.ones(megabytes << 18, device=device)  # float32: megabytes MiB
    target = torch.empty_like(source)
    target.copy_(source)
    best = None
    for _ in range(rounds):
        if device.type == "cuda":
            seconds = timing.milliseconds_per_call(lambda: target.copy_(source), device, 10) / 1e3
        else:
            began = time.perf_counter()
            target.copy_(source)
            seconds = time.perf_counter() - began
        best = seconds if best is None else min(best, seconds)
    return 2 * source.numel() * source.element_size() / best


def step_activation_bytes(case: DecodeCase) -> int:
    """One single-token step's activations, in the case's dtype: the new tokens' q, k, v, rotated
    q and k, attention output and output projection, and one score and one mask value per query
    head and slot."""
    itemsize = case.dtype.itemsize
    kv_dim = case.kv_heads * case.head_dim
    per_token = 4 * case.embed + 3 * kv_dim + (case.heads + 1) * case.max_seq_len
    return case.batch * per_token * itemsize


# torch.profiler's ATen ops, by the part of a step they do.
_STEP_PARTS = (
    # torchmha's few-token steps attend by batched GEMMs and a softmax over the cache.
    ("attention", ("scaled_dot_product", "flash_attention", "aten::bmm", "softmax")),
    ("projections", ("aten::mm", "aten::addmm")),
    ("cache writes", ("aten::scatter_", "aten::index_copy_", "aten::index_put_")),
)


def step_breakdown(step: Callable[[], torch.Tensor], calls: int = 5) -> Dict[str, float]:
    """Where a step's time goes: the self CPU time of its ATen ops per step (ms), by part
    (attention kernel, projection GEMMs, cache writes, the rest), from torch.profiler over
    ``calls`` steps after one untimed step."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                step()
    parts = {name: 0.0 for name, _ in _STEP_PARTS}
    parts["rest"] = 0.0
    for event in prof.key_averages():
        part = next((n for n, keys in _STEP_PARTS if any(k in event.key for k in keys)), "rest")
        parts[part] += event.self_cpu_time_total / 1e3 / calls
    parts["total"] = sum(parts.values())
    return parts
