"""torchmha against Hugging Face ``transformers``' attention modules, which nobody here wrote.

``LlamaAttention`` (grouped heads, rotary embeddings), ``GPTNeoXAttention`` (partial rotary)
and ``GPTJAttention`` (interleaved rotary, partial) are built from small random configs, no
download; their weights move into ``torchmha.MultiHeadAttention`` through
``torchmha.load_separate_projections``. Outputs, the gradients of the input and of every
parameter (and Llama's per-head weights) must agree, with ``position_ids`` including a
left-padded batch with per-row positions, and Hugging Face's own causal masks
(``transformers.masking_utils.create_causal_mask``, as ``LlamaModel`` builds them).

Rotary tables: Hugging Face computes cos/sin in float32 even for a float64 model
(``LlamaRotaryEmbedding.forward`` does ``position_ids.float() * inv_freq.float()``, and
``compute_default_rope_parameters`` builds ``inv_freq`` from
``torch.arange(..., dtype=torch.float)``; ``GPTJRotaryEmbedding`` keeps a float32 buffer).
So each comparison runs twice: with the tables those classes' formulas give in float64
(tolerance 1e-10), and with the classes' stock float32 tables (float32 tolerance, atol 1e-5 /
rtol 1e-4).

Tolerances: 1e-10 (absolute and relative) with ``attn_implementation="sdpa"``; Hugging Face's
``"eager"`` implementations compute the softmax in float32 even for float64 models
(``softmax(..., dtype=torch.float32)`` in Llama's and GPT-NeoX's, a float32 ``matmul`` in
GPT-J's), so eager comparisons use the float32 tolerance.
"""

from typing import Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from transformers import GPTJConfig, GPTNeoXConfig, LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXAttention,
    GPTNeoXRotaryEmbedding,
)
from transformers.models.gptj.modeling_gptj import GPTJAttention, GPTJRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

import torchmha

F64 = torch.float64
EXACT = {"atol": 1e-10, "rtol": 1e-10}
FLOAT32 = {"atol": 1e-5, "rtol": 1e-4}
ROPE_THETA = 10000.0
BATCH, LENGTH = 3, 6

# (hidden size, attention heads, key/value heads)
LLAMA_SHAPES = {"h32-4q-2kv": (32, 4, 2), "h64-8q-2kv": (64, 8, 2)}
IMPLEMENTATIONS = ["eager", "sdpa"]


# --- positions and masks -------------------------------------------------------------------------


def position_case(name: str) -> Tuple[Optional[Tensor], Tensor]:
    """``(attention_mask (N, L) or None, position_ids (N, L))`` as ``generate`` makes them."""
    if name == "default":
        return None, torch.arange(LENGTH).expand(BATCH, -1)
    if name == "offset":
        # Each row continues a text at its own offset.
        return None, torch.arange(LENGTH) + torch.tensor([[0], [3], [11]])
    # Left-padded: row i starts with i pads; pads sit at position 1, as in transformers' generate.
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    for row in range(BATCH):
        attention_mask[row, :row] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    return attention_mask, position_ids


POSITION_CASES = ["default", "offset", "left-padded"]


def hf_mask(
    config, hidden: Tensor, attention_mask: Optional[Tensor], position_ids: Tensor, cache=None
):
    """The causal mask ``LlamaModel`` gives its attention layers (per implementation).

    The eager implementations take a float mask filled with the dtype's minimum, and compute
    their softmax in float32: float64's minimum becomes -inf there, and a pad row (every key
    masked) becomes NaN, which reaches every parameter's gradient. Those get the mask
    transformers makes for float32 (finite in float32), so pad rows stay finite. With ``cache``,
    the mask of a decoding step, made before the cache grows."""
    dtype = hidden.dtype
    mask = create_causal_mask(
        config=config,
        inputs_embeds=hidden.float() if config._attn_implementation == "eager" else hidden,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
    )
    return mask.to(dtype) if mask is not None and mask.is_floating_point() else mask


def torchmha_arguments(attention_mask: Optional[Tensor], position_ids: Tensor, name: str) -> dict:
    """The same attention in torchmha's terms: causal, padding keys masked, the positions."""
    arguments = {"is_causal": True}
    if attention_mask is not None:
        arguments["key_padding_mask"] = attention_mask == 0
    if name != "default":
        arguments["positions"] = position_ids
    return arguments


def valid_rows(attention_mask: Optional[Tensor]) -> Tensor:
    """Query rows that are real tokens (a pad row's output is undefined: every key is masked)."""
    if attention_mask is None:
        return torch.ones(BATCH, LENGTH, dtype=torch.bool)
    return attention_mask.bool()


# --- rotary tables in float64, by the formulas of transformers' own classes ----------------------


def rope_tables_float64(
    head_dim: int, theta: float, position_ids: Tensor, partial_rotary_factor: float = 1.0
) -> Tuple[Tensor, Tensor]:
    """``LlamaRotaryEmbedding`` / ``GPTNeoXRotaryEmbedding`` (default rope type), in float64:
    ``compute_default_rope_parameters`` then ``forward``, line by line, with float64 for float."""
    dim = int(head_dim * partial_rotary_factor)
    attention_scaling = 1.0
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=F64) / dim))
    freqs = position_ids[..., None].to(F64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_scaling, emb.sin() * attention_scaling


def gptj_embed_positions_float64(num_pos: int, dim: int) -> Tensor:
    """``create_sinusoidal_positions`` of transformers' GPT-J, in float64."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=F64) / dim))
    sinusoid_inp = torch.arange(num_pos, dtype=F64)[:, None] * inv_freq
    return torch.cat((torch.sin(sinusoid_inp), torch.cos(sinusoid_inp)), dim=1)


# --- running both sides ---------------------------------------------------------------------------


def run(module: nn.Module, call, hidden: Tensor, cotangent: Tensor) -> Dict[str, Tensor]:
    """Output (and weights), input gradient and every parameter's gradient."""
    module.zero_grad(set_to_none=True)
    leaf = hidden.detach().clone().requires_grad_(True)
    output, weights = call(leaf)
    (output * cotangent).sum().backward()
    found = {"output": output.detach(), "input.grad": leaf.grad}
    if weights is not None:
        found["weights"] = weights.detach()
    found.update({f"{name}.grad": p.grad for name, p in module.named_parameters()})
    return found


def torchmha_gradients_as_projections(
    found: Dict[str, Tensor], embed_dim: int, prefix: Dict[str, str]
) -> Dict[str, Tensor]:
    """torchmha's parameter gradients under the checkpoint's names (rows of in_proj split)."""
    kv_dim = (found["in_proj_weight.grad"].shape[0] - embed_dim) // 2
    sizes = [embed_dim, kv_dim, kv_dim]
    renamed = {}
    for name, grad in zip(
        ("q_proj", "k_proj", "v_proj"), found["in_proj_weight.grad"].split(sizes)
    ):
        renamed[f"{prefix[name]}.weight.grad"] = grad
    if "in_proj_bias.grad" in found:
        for name, grad in zip(
            ("q_proj", "k_proj", "v_proj"), found["in_proj_bias.grad"].split(sizes)
        ):
            renamed[f"{prefix[name]}.bias.grad"] = grad
        renamed[f"{prefix['o_proj']}.bias.grad"] = found["out_proj.bias.grad"]
    renamed[f"{prefix['o_proj']}.weight.grad"] = found["out_proj.weight.grad"]
    return renamed


LLAMA_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj"}


def assert_same(
    ours: Dict[str, Tensor], theirs: Dict[str, Tensor], rows: Tensor, tolerance: dict
) -> None:
    """Outputs on real rows, weights on real rows, and every gradient."""
    torch.testing.assert_close(ours["output"][rows], theirs["output"][rows], **tolerance)
    torch.testing.assert_close(ours["input.grad"], theirs["input.grad"], **tolerance)
    gradients = [name for name in theirs if name.endswith(".grad") and name != "input.grad"]
    assert gradients, "the reference has no parameter gradients"
    for name in gradients:
        torch.testing.assert_close(
            ours[name], theirs[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}"
        )


# --- Llama ----------------------------------------------------------------------------------------


def llama_config(shape: str, implementation: str, attention_bias: bool) -> LlamaConfig:
    hidden, heads, kv_heads = LLAMA_SHAPES[shape]
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attention_bias=attention_bias,
        attn_implementation=implementation,
    )


def llama(
    shape: str, implementation: str, attention_bias: bool, dtype=F64
) -> Tuple[LlamaConfig, LlamaAttention, torchmha.MultiHeadAttention]:
    hidden, heads, kv_heads = LLAMA_SHAPES[shape]
    config = llama_config(shape, implementation, attention_bias)
    reference = LlamaAttention(config, layer_idx=0).to(dtype)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    ours = torchmha.MultiHeadAttention(
        hidden,
        heads,
        bias=attention_bias,
        batch_first=True,
        num_kv_heads=kv_heads,
        rope_theta=ROPE_THETA,
        dtype=dtype,
    )
    torchmha.load_separate_projections(ours, reference.state_dict())
    return config, reference.eval(), ours.eval()


def llama_inputs(config: LlamaConfig, attention_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """float64 hidden states and output cotangent (zero on pad rows, whose outputs are
    undefined, so no gradient flows through them)."""
    hidden = torch.randn(BATCH, LENGTH, config.hidden_size, dtype=F64)
    cotangent = torch.randn(BATCH, LENGTH, config.hidden_size, dtype=F64)
    return hidden, cotangent * valid_rows(attention_mask)[..., None]


def hf_llama_results(
    config, reference, position: str, tables: str, need_weights: bool, hidden, cotangent
) -> Dict[str, Tensor]:
    """transformers' LlamaAttention with its mask, position_ids and rotary tables."""
    attention_mask, position_ids = position_case(position)
    if tables == "float64":
        cos, sin = rope_tables_float64(config.head_dim, ROPE_THETA, position_ids)
    else:
        cos, sin = LlamaRotaryEmbedding(config)(hidden, position_ids)
    mask = hf_mask(config, hidden, attention_mask, position_ids)

    def call(x: Tensor):
        output, weights = reference(
            x, position_embeddings=(cos.to(x.dtype), sin.to(x.dtype)), attention_mask=mask
        )
        return output, weights if need_weights else None

    return run(reference, call, hidden, cotangent)


def torchmha_results(
    config, ours, position: str, need_weights: bool, hidden, cotangent
) -> Dict[str, Tensor]:
    """torchmha on the same tokens; parameter gradients under the checkpoint's names too."""
    attention_mask, position_ids = position_case(position)
    arguments = torchmha_arguments(attention_mask, position_ids, position)

    def call(x: Tensor):
        return ours(x, x, x, need_weights=need_weights, average_attn_weights=False, **arguments)

    found = run(ours, call, hidden, cotangent)
    found.update(torchmha_gradients_as_projections(found, config.hidden_size, LLAMA_NAMES))
    return found


def llama_results(config, reference, ours, position: str, tables: str, need_weights: bool):
    attention_mask, _ = position_case(position)
    hidden, cotangent = llama_inputs(config, attention_mask)
    theirs = hf_llama_results(config, reference, position, tables, need_weights, hidden, cotangent)
    mine = torchmha_results(config, ours, position, need_weights, hidden, cotangent)
    return mine, theirs, valid_rows(attention_mask)


@pytest.mark.parametrize("position", POSITION_CASES)
@pytest.mark.parametrize("attention_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", LLAMA_SHAPES)
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
def test_llama_attention_float64_tables(
    shape, implementation, attention_bias, position, need_weights
) -> None:
    config, reference, ours = llama(shape, implementation, attention_bias)
    hf_weights = need_weights and implementation == "eager"  # HF's SDPA path returns no weights
    mine, theirs, rows = llama_results(config, reference, ours, position, "float64", need_weights)
    if not hf_weights:
        theirs.pop("weights", None)
    tolerance = EXACT if implementation == "sdpa" else FLOAT32
    assert_same(mine, theirs, rows, tolerance)
    if hf_weights:
        torch.testing.assert_close(
            mine["weights"].transpose(1, 2)[rows],
            theirs["weights"].transpose(1, 2)[rows],
            **tolerance,
        )


@pytest.mark.parametrize("position", POSITION_CASES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_llama_attention_stock_float32_tables(implementation: str, position: str) -> None:
    """Hugging Face's own float32 tables with a float64 model: float32's tolerance."""
    config, reference, ours = llama("h32-4q-2kv", implementation, attention_bias=True)
    mine, theirs, rows = llama_results(config, reference, ours, position, "stock", False)
    assert_same(mine, theirs, rows, FLOAT32)


@pytest.mark.parametrize("position", POSITION_CASES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_llama_attention_float32_model(implementation: str, position: str) -> None:
    """A float32 model end to end (both sides make their own float32 tables). Neither side is
    the truth: that is transformers' SDPA implementation in float64 with float64 tables, on the
    same (float32) weights and inputs; torchmha's float32 error to it may be at most twice
    transformers' own float32 error, plus 1e-6."""
    config, reference, ours = llama("h64-8q-2kv", implementation, False, dtype=torch.float32)
    attention_mask, _ = position_case(position)
    hidden, cotangent = llama_inputs(config, attention_mask)
    hidden, cotangent = hidden.float(), cotangent.float()
    theirs = hf_llama_results(config, reference, position, "stock", False, hidden, cotangent)
    mine = torchmha_results(config, ours, position, False, hidden, cotangent)
    truth_config = llama_config("h64-8q-2kv", "sdpa", False)
    truth_model = LlamaAttention(truth_config, layer_idx=0).to(F64)
    truth_model.load_state_dict(reference.state_dict())
    truth = hf_llama_results(
        truth_config, truth_model, position, "float64", False, hidden.double(), cotangent.double()
    )
    rows = valid_rows(attention_mask)
    names = [name for name in truth if name == "output" or name.endswith(".grad")]
    assert len(names) == 6  # output, input and the four projections' weights
    for name in names:
        select = rows if name == "output" else slice(None)
        our_error = (mine[name][select].double() - truth[name][select]).abs().max().item()
        their_error = (theirs[name][select].double() - truth[name][select]).abs().max().item()
        assert our_error <= 2 * their_error + 1e-6, (name, our_error, their_error)


def test_float64_tables_follow_transformers_formula() -> None:
    """The float64 tables used above round to the tables transformers' class computes."""
    config = llama_config("h32-4q-2kv", "sdpa", False)
    _, position_ids = position_case("offset")
    hidden = torch.zeros(BATCH, LENGTH, config.hidden_size)
    cos, sin = LlamaRotaryEmbedding(config)(hidden, position_ids)
    cos64, sin64 = rope_tables_float64(config.head_dim, ROPE_THETA, position_ids)
    torch.testing.assert_close(cos64.float(), cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin64.float(), sin, atol=1e-6, rtol=0)


# --- GPT-NeoX: partial rotary ---------------------------------------------------------------------


def neox_weights_to_torchmha(state: Dict[str, Tensor], heads: int) -> Dict[str, Tensor]:
    """GPT-NeoX's fused ``query_key_value`` keeps [q | k | v] per head; torchmha, q/k/v blocks."""
    hidden = state["dense.weight"].shape[0]
    head_dim = hidden // heads
    weight = state["query_key_value.weight"].view(heads, 3, head_dim, hidden)
    bias = state["query_key_value.bias"].view(heads, 3, head_dim)
    return {
        "q_proj.weight": weight[:, 0].reshape(hidden, hidden),
        "k_proj.weight": weight[:, 1].reshape(hidden, hidden),
        "v_proj.weight": weight[:, 2].reshape(hidden, hidden),
        "q_proj.bias": bias[:, 0].reshape(hidden),
        "k_proj.bias": bias[:, 1].reshape(hidden),
        "v_proj.bias": bias[:, 2].reshape(hidden),
        "o_proj.weight": state["dense.weight"],
        "o_proj.bias": state["dense.bias"],
    }


def neox_gradients(found: Dict[str, Tensor], heads: int) -> Dict[str, Tensor]:
    """torchmha's gradients in GPT-NeoX's layout (the inverse of the weights' permutation)."""
    hidden = found["out_proj.weight.grad"].shape[0]
    head_dim = hidden // heads
    weight = found["in_proj_weight.grad"].view(3, heads, head_dim, hidden).transpose(0, 1)
    bias = found["in_proj_bias.grad"].view(3, heads, head_dim).transpose(0, 1)
    return {
        "query_key_value.weight.grad": weight.reshape(3 * hidden, hidden),
        "query_key_value.bias.grad": bias.reshape(3 * hidden),
        "dense.weight.grad": found["out_proj.weight.grad"],
        "dense.bias.grad": found["out_proj.bias.grad"],
    }


@pytest.mark.parametrize("position", POSITION_CASES)
@pytest.mark.parametrize("tables", ["float64", "stock"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_gpt_neox_partial_rotary(implementation: str, tables: str, position: str) -> None:
    hidden_size, heads, factor = 32, 4, 0.25
    config = GPTNeoXConfig(
        hidden_size=hidden_size,
        num_attention_heads=heads,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": ROPE_THETA,
            "partial_rotary_factor": factor,
        },
        attention_bias=True,
        attn_implementation=implementation,
    )
    reference = GPTNeoXAttention(config, layer_idx=0).to(F64).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    head_dim = hidden_size // heads
    assert reference.rotary_ndims == int(head_dim * factor) < head_dim
    ours = torchmha.MultiHeadAttention(
        hidden_size,
        heads,
        batch_first=True,
        rope_theta=ROPE_THETA,
        rotary_dim=reference.rotary_ndims,
        dtype=F64,
    ).eval()
    torchmha.load_separate_projections(
        ours, neox_weights_to_torchmha(reference.state_dict(), heads)
    )

    attention_mask, position_ids = position_case(position)
    hidden = torch.randn(BATCH, LENGTH, hidden_size, dtype=F64)
    rows = valid_rows(attention_mask)
    cotangent = torch.randn(BATCH, LENGTH, hidden_size, dtype=F64) * rows[..., None]
    if tables == "float64":
        cos, sin = rope_tables_float64(head_dim, ROPE_THETA, position_ids, factor)
    else:
        cos, sin = GPTNeoXRotaryEmbedding(config)(hidden, position_ids)
    mask = hf_mask(config, hidden, attention_mask, position_ids)
    arguments = torchmha_arguments(attention_mask, position_ids, position)
    theirs = run(
        reference,
        lambda x: (reference(x, mask, position_embeddings=(cos, sin))[0], None),
        hidden,
        cotangent,
    )
    mine = run(ours, lambda x: ours(x, x, x, need_weights=False, **arguments), hidden, cotangent)
    mine.update(neox_gradients(mine, heads))
    exact = tables == "float64" and implementation == "sdpa"
    assert_same(mine, theirs, rows, EXACT if exact else FLOAT32)


# --- GPT-J: interleaved rotary --------------------------------------------------------------------


GPTJ_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "out_proj"}


@pytest.mark.parametrize("position", POSITION_CASES)
@pytest.mark.parametrize("tables", ["float64", "stock"])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("rotary_dim", [4, 8], ids=["partial", "full"])
def test_gpt_j_interleaved_rotary(
    rotary_dim: int, implementation: str, tables: str, position: str
) -> None:
    hidden_size, heads = 32, 4
    config = GPTJConfig(
        n_embd=hidden_size,
        n_head=heads,
        n_positions=64,
        rotary_dim=rotary_dim,
        attn_implementation=implementation,
    )
    reference = GPTJAttention(config, layer_idx=0).to(F64).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.3)
    ours = torchmha.MultiHeadAttention(
        hidden_size,
        heads,
        bias=False,
        batch_first=True,
        rope_theta=10000.0,
        rotary_dim=rotary_dim,
        rotary_interleaved=True,
        dtype=F64,
    ).eval()
    state = {name.replace("out_proj", "o_proj"): t for name, t in reference.state_dict().items()}
    torchmha.load_separate_projections(ours, state)

    attention_mask, position_ids = position_case(position)
    hidden = torch.randn(BATCH, LENGTH, hidden_size, dtype=F64)
    rows = valid_rows(attention_mask)
    cotangent = torch.randn(BATCH, LENGTH, hidden_size, dtype=F64) * rows[..., None]
    rotary = GPTJRotaryEmbedding(config)
    if tables == "float64":
        # transformers' own forward (index by position, split into sin and cos) on float64 tables.
        rotary.embed_positions = gptj_embed_positions_float64(config.n_positions, rotary_dim)
    sin, cos = rotary(hidden, position_ids)
    mask = hf_mask(config, hidden, attention_mask, position_ids)
    arguments = torchmha_arguments(attention_mask, position_ids, position)
    theirs = run(
        reference,
        lambda x: (reference(x, (sin, cos), attention_mask=mask)[0], None),
        hidden,
        cotangent,
    )
    mine = run(ours, lambda x: ours(x, x, x, need_weights=False, **arguments), hidden, cotangent)
    mine.update(torchmha_gradients_as_projections(mine, hidden_size, GPTJ_NAMES))
    exact = tables == "float64" and implementation == "sdpa"
    assert_same(mine, theirs, rows, EXACT if exact else FLOAT32)


# --- decoding with a key/value cache, step by step ------------------------------------------------

# Prefill, single tokens, a chunk, single tokens: the lengths of the successive steps.
DECODING_STEPS = (5, 1, 1, 3, 1, 1)
CACHE_LENGTH = 16


def hf_cache(kind: str, config: LlamaConfig):
    from transformers import DynamicCache, StaticCache

    if kind == "dynamic":
        return DynamicCache(config=config)
    return StaticCache(config=config, max_cache_len=CACHE_LENGTH)


def hf_decoding_step(config, reference, cache, hidden: Tensor, past: int, tables: str):
    """One step as ``LlamaModel`` runs it: its mask (made before the cache grows), the rotary
    tables of positions ``past, past + 1, ...``, then the attention updating ``cache``."""
    position_ids = (past + torch.arange(hidden.shape[1])).expand(hidden.shape[0], -1)
    mask = hf_mask(config, hidden, None, position_ids, cache)
    if tables == "float64":
        cos, sin = rope_tables_float64(
            config.hidden_size // config.num_attention_heads, ROPE_THETA, position_ids
        )
    else:
        cos, sin = LlamaRotaryEmbedding(config)(hidden, position_ids)
    return reference(
        hidden,
        position_embeddings=(cos.to(hidden.dtype), sin.to(hidden.dtype)),
        attention_mask=mask,
        cache=cache,
    )


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("attention_bias", [False, True])
def test_decoding_step_by_step_equals_llama_attention_with_its_cache(
    cache_kind: str, attention_bias: bool
) -> None:
    """Prefill, single tokens and a chunk: each step's output equals ``LlamaAttention`` with
    ``DynamicCache``/``StaticCache`` (SDPA implementation, float64 tables: 1e-10)."""
    config, reference, ours = llama("h64-8q-2kv", "sdpa", attention_bias)
    theirs_cache = hf_cache(cache_kind, config)
    our_cache = ours.new_kv_cache(2, CACHE_LENGTH)
    past = 0
    with torch.no_grad():
        for length in DECODING_STEPS:
            hidden = torch.randn(2, length, config.hidden_size, dtype=F64)
            theirs, _ = hf_decoding_step(config, reference, theirs_cache, hidden, past, "float64")
            mine, _ = ours(
                hidden, hidden, hidden, kv_cache=our_cache, is_causal=True, need_weights=False
            )
            torch.testing.assert_close(mine, theirs, **EXACT, msg=lambda m, p=past: f"at {p}: {m}")
            past += length
    assert our_cache.seq_lens.tolist() == [past, past]
    assert int(theirs_cache.get_seq_length()) == past


def test_decoding_weights_equal_llama_eager_attention_with_a_static_cache() -> None:
    """Per-head weights over the cache's slots, as ``LlamaAttention`` (eager) returns them with
    a ``StaticCache`` of as many slots: zero beyond the length. Eager's float32 softmax sets the
    tolerance."""
    config, reference, ours = llama("h32-4q-2kv", "eager", attention_bias=True)
    theirs_cache = hf_cache("static", config)
    our_cache = ours.new_kv_cache(2, CACHE_LENGTH)
    past = 0
    with torch.no_grad():
        for length in DECODING_STEPS:
            hidden = torch.randn(2, length, config.hidden_size, dtype=F64)
            theirs, their_weights = hf_decoding_step(
                config, reference, theirs_cache, hidden, past, "float64"
            )
            mine, my_weights = ours(
                hidden,
                hidden,
                hidden,
                kv_cache=our_cache,
                is_causal=True,
                average_attn_weights=False,
            )
            assert my_weights.shape == (2, config.num_attention_heads, length, CACHE_LENGTH)
            torch.testing.assert_close(mine, theirs, **FLOAT32)
            torch.testing.assert_close(my_weights, their_weights, **FLOAT32)
            assert (my_weights[..., past + length :] == 0).all()
            past += length
