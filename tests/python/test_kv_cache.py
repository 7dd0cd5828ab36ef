"""The key/value cache: decoding step by step equals one full causal forward, and bad steps are
refused before the cache is touched.

The reference is ``grouped_rotary_reference.GroupedRotaryAttention`` (PyTorch's
``multi_head_attention_forward`` after grouped projections and rotary embeddings written from
their definitions) run over each whole sequence at once with a causal mask; torchmha decodes the
same sequence through ``torchmha.KVCache``: a prefill, then one token at a time or in chunks, in
float64 at 1e-12 (absolute) / 1e-10 (relative), outputs and weights (zero beyond each entry's
length). Grouped heads, rotary embeddings (full, partial, interleaved), biases, both layouts,
unbatched inputs, ragged prompts (right padding in ``key_padding_mask``) and ``reorder``.
"""

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from grouped_rotary_reference import GroupedRotaryAttention
from torch import Tensor

import torchmha

F64 = torch.float64
EMBED_DIM, NUM_HEADS = 24, 4
THETA = 100.0
TOLERANCE = {"atol": 1e-12, "rtol": 1e-10}

# name -> (num_kv_heads, rope_theta, rotary_dim, rotary_interleaved, bias)
FEATURES: Dict[str, Tuple[Optional[int], Optional[float], Optional[int], bool, bool]] = {
    "mha": (None, None, None, False, True),
    "gqa-rope": (2, THETA, None, False, True),
    "mqa-rope-partial-interleaved": (1, THETA, 4, True, True),
    "gqa-rope-partial-no-bias": (2, THETA, 2, False, False),
}


def make_pair(
    feature: str, batch_first: bool = True
) -> Tuple[torchmha.MultiHeadAttention, GroupedRotaryAttention]:
    """A torchmha module with random weights and the reference holding the same ones."""
    num_kv_heads, theta, rotary_dim, interleaved, bias = FEATURES[feature]
    options: Dict[str, Any] = {
        "num_kv_heads": num_kv_heads,
        "rope_theta": theta,
        "rotary_dim": rotary_dim,
        "rotary_interleaved": interleaved,
    }
    attention = torchmha.MultiHeadAttention(
        EMBED_DIM, NUM_HEADS, bias=bias, batch_first=batch_first, dtype=F64, **options
    )
    reference = GroupedRotaryAttention(
        EMBED_DIM, NUM_HEADS, bias=bias, batch_first=True, dtype=F64, **options
    )
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    reference.load_state_dict(attention.state_dict(), strict=True)
    return attention, reference


def full_causal(
    reference: GroupedRotaryAttention, sequence: Tensor, average: bool = True
) -> Tuple[Tensor, Tensor]:
    """The reference over whole (N, T, E) sequences with a causal mask: (output, weights)."""
    length = sequence.size(1)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    output, weights = reference(
        sequence, sequence, sequence, attn_mask=causal, average_attn_weights=average
    )
    assert weights is not None
    return output, weights


def step(
    attention: torchmha.MultiHeadAttention,
    cache: torchmha.KVCache,
    tokens: Tensor,
    **kwargs: Any,
) -> Tuple[Tensor, Optional[Tensor]]:
    """One decoding step on batch-first (N, L, E) tokens, in the module's layout."""
    if not attention.batch_first:
        tokens = tokens.transpose(0, 1)
    kwargs.setdefault("is_causal", True)
    with torch.no_grad():
        output, weights = attention(tokens, tokens, tokens, kv_cache=cache, **kwargs)
    if not attention.batch_first:
        output = output.transpose(0, 1)
    return output, weights


def assert_weights(weights: Tensor, expected: Tensor, length: int) -> None:
    """Cache weights (..., L, max_seq_len): the reference's over the first ``length`` positions,
    zero beyond."""
    torch.testing.assert_close(weights[..., :length], expected, **TOLERANCE)
    assert torch.equal(weights[..., length:], torch.zeros_like(weights[..., length:]))


# A step of more than 16 tokens attends through SDPA; fewer, through grouped GEMMs over the cache.
CHUNKINGS = {
    "token-by-token": [4, 1, 1, 1, 1, 1],
    "chunks": [3, 2, 4],
    "one-chunk": [9],
    "long-prefill": [18, 1, 2],
}


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
@pytest.mark.parametrize("weights", ["fused", "averaged", "per-head"])
def test_decoding_equals_the_full_causal_forward(
    feature: str, chunking: str, batch_first: bool, weights: str
) -> None:
    attention, reference = make_pair(feature, batch_first)
    sequence = torch.randn(2, sum(CHUNKINGS[chunking]), EMBED_DIM, dtype=F64)
    average = weights != "per-head"
    expected_output, expected_weights = full_causal(reference, sequence, average)
    max_seq_len = sequence.shape[1] + 3
    cache = attention.new_kv_cache(2, max_seq_len)
    start = 0
    for length in CHUNKINGS[chunking]:
        end = start + length
        output, step_weights = step(
            attention,
            cache,
            sequence[:, start:end],
            need_weights=weights != "fused",
            average_attn_weights=average,
        )
        torch.testing.assert_close(output, expected_output[:, start:end], **TOLERANCE)
        if weights == "fused":
            assert step_weights is None
        else:
            assert step_weights is not None
            expected_shape = (2, NUM_HEADS, length, max_seq_len)
            if average:
                expected_shape = (2, length, max_seq_len)
            assert step_weights.shape == expected_shape
            assert_weights(step_weights, expected_weights[..., start:end, :end], end)
        assert cache.seq_lens.tolist() == [end, end]
        start = end


def test_unbatched_decoding_uses_a_cache_of_one_entry() -> None:
    attention, reference = make_pair("gqa-rope")
    sequence = torch.randn(1, 6, EMBED_DIM, dtype=F64)
    expected_output, expected_weights = full_causal(reference, sequence)
    cache = attention.new_kv_cache(1, 8)
    for start, end in [(0, 3), (3, 4), (4, 6)]:
        with torch.no_grad():
            tokens = sequence[0, start:end]
            output, weights = attention(tokens, tokens, tokens, kv_cache=cache, is_causal=True)
        torch.testing.assert_close(output, expected_output[0, start:end], **TOLERANCE)
        assert weights is not None and weights.shape == (end - start, 8)
        assert_weights(weights, expected_weights[0, start:end, :end], end)
    assert cache.seq_lens.tolist() == [6]


@pytest.mark.parametrize("feature", ["mha", "gqa-rope", "mqa-rope-partial-interleaved"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_ragged_prompts_then_tokens_equal_each_entrys_own_forward(
    feature: str, need_weights: bool
) -> None:
    """Right-padded prompts of lengths 5, 2 and 3 (padding in key_padding_mask), then three
    single-token steps, each entry at its own length: each entry equals its own sequence's
    full causal forward."""
    attention, reference = make_pair(feature)
    prompt_lengths = [5, 2, 3]
    generated = 3
    sequences = [torch.randn(1, n + generated, EMBED_DIM, dtype=F64) for n in prompt_lengths]
    expected = [full_causal(reference, sequence) for sequence in sequences]
    prompts = torch.zeros(3, 5, EMBED_DIM, dtype=F64)
    padding = torch.ones(3, 5, dtype=torch.bool)
    for entry, length in enumerate(prompt_lengths):
        prompts[entry, :length] = sequences[entry][0, :length]
        padding[entry, :length] = False
    cache = attention.new_kv_cache(3, 10)
    output, weights = step(
        attention,
        cache,
        prompts,
        key_padding_mask=padding,
        is_causal=True,
        need_weights=need_weights,
    )
    assert cache.seq_lens.tolist() == prompt_lengths
    for entry, length in enumerate(prompt_lengths):
        expected_output, expected_weights = expected[entry]
        torch.testing.assert_close(output[entry, :length], expected_output[0, :length], **TOLERANCE)
        if need_weights:
            assert weights is not None
            assert_weights(weights[entry, :length], expected_weights[0, :length, :length], length)
    for index in range(generated):
        tokens = torch.cat(
            [
                sequences[entry][:, n + index : n + index + 1]
                for entry, n in enumerate(prompt_lengths)
            ]
        )
        output, weights = step(attention, cache, tokens, need_weights=need_weights)
        for entry, length in enumerate(prompt_lengths):
            position = length + index
            expected_output, expected_weights = expected[entry]
            torch.testing.assert_close(output[entry, 0], expected_output[0, position], **TOLERANCE)
            if need_weights:
                assert weights is not None
                assert_weights(
                    weights[entry, 0], expected_weights[0, position, : position + 1], position + 1
                )
    assert cache.seq_lens.tolist() == [n + generated for n in prompt_lengths]


def test_reorder_selects_and_repeats_entries_as_beam_search_does() -> None:
    attention, reference = make_pair("gqa-rope")
    prompts = torch.randn(3, 4, EMBED_DIM, dtype=F64)
    cache = attention.new_kv_cache(3, 8)
    step(attention, cache, prompts[:, :3])
    cache.reorder(torch.tensor([2, 0, 0]))
    cache.reorder([0, 1, 2])  # the identity changes nothing
    continuation = torch.randn(3, 2, EMBED_DIM, dtype=F64)
    output, weights = step(attention, cache, continuation, need_weights=True)
    assert cache.seq_lens.tolist() == [5, 5, 5]
    for entry, source in enumerate([2, 0, 0]):
        sequence = torch.cat([prompts[source : source + 1, :3], continuation[entry : entry + 1]], 1)
        expected_output, expected_weights = full_causal(reference, sequence)
        torch.testing.assert_close(output[entry], expected_output[0, 3:], **TOLERANCE)
        assert weights is not None
        assert_weights(weights[entry], expected_weights[0, 3:], 5)


def test_a_chunk_without_is_causal_sees_all_its_new_tokens() -> None:
    """is_causal=False: every new token sees the cached positions and all new real tokens
    (the reference: a mask that is causal over the prefix, open within the last chunk)."""
    attention, reference = make_pair("gqa-rope")
    sequence = torch.randn(2, 7, EMBED_DIM, dtype=F64)
    cache = attention.new_kv_cache(2, 7)
    step(attention, cache, sequence[:, :4])
    output, weights = step(attention, cache, sequence[:, 4:], is_causal=False, need_weights=True)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)
    mask[4:, 4:] = False
    expected_output, expected_weights = reference(sequence, sequence, sequence, attn_mask=mask)
    torch.testing.assert_close(output, expected_output[:, 4:], **TOLERANCE)
    assert weights is not None
    torch.testing.assert_close(weights, expected_weights[:, 4:], **TOLERANCE)


@pytest.mark.parametrize("feature", ["mha", "gqa-no-rope"])
def test_a_cross_attention_cache_projects_the_memory_once(feature: str) -> None:
    """Encoder-decoder: the first step's ``key``/``value`` are the memory (right-padded, ragged),
    later steps give none (length 0) and reuse its cached keys and values. Each step equals
    attending to the whole memory without a cache, outputs and weights."""
    attention = module_with(num_kv_heads=None if feature == "mha" else 2)
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    memory = torch.randn(2, 5, EMBED_DIM, dtype=F64)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    cache = attention.new_kv_cache(2, 7)
    no_memory = memory[:, :0]
    with torch.no_grad():
        for number, length in enumerate([2, 1, 1, 3]):
            queries = torch.randn(2, length, EMBED_DIM, dtype=F64)
            expected, expected_weights = attention(
                queries, memory, memory, key_padding_mask=padding, average_attn_weights=False
            )
            source = memory if number == 0 else no_memory
            output, weights = attention(
                queries,
                source,
                source,
                kv_cache=cache,
                key_padding_mask=padding if number == 0 else None,
                average_attn_weights=False,
            )
            torch.testing.assert_close(output, expected, **TOLERANCE)
            assert_weights(weights, expected_weights, 5)
            assert cache.seq_lens.tolist() == [5, 3]


def test_kv_cache_module() -> None:
    attention = torchmha.MultiHeadAttention(
        EMBED_DIM, NUM_HEADS, num_kv_heads=2, rope_theta=THETA, dtype=F64
    )
    cache = attention.new_kv_cache(3, 16)
    assert isinstance(cache, torch.nn.Module)
    assert cache.key.shape == cache.value.shape == (3, 2, 16, EMBED_DIM // NUM_HEADS)
    assert cache.key.dtype == F64 and cache.seq_lens.dtype == torch.int64
    assert (cache.batch_size, cache.num_kv_heads, cache.max_seq_len, cache.head_dim) == (
        3,
        2,
        16,
        6,
    )
    assert attention.new_kv_cache(1, 4, dtype=torch.float32).key.dtype == torch.float32
    # Buffers, not state: they move with .to() and stay out of checkpoints.
    assert dict(cache.named_buffers()).keys() == {"key", "value", "seq_lens"}
    assert cache.state_dict() == {}
    assert cache.to(torch.float32).key.dtype == torch.float32
    assert cache.seq_lens.dtype == torch.int64
    step(attention.float(), cache, torch.randn(3, 2, EMBED_DIM))
    assert cache.seq_lens.tolist() == [2, 2, 2]
    cache.reset()
    assert cache.seq_lens.tolist() == [0, 0, 0]
    assert not cache.key.any() and not cache.value.any()
    for bad_size in [0, -1, 2.0, True]:
        with pytest.raises(ValueError, match="max_seq_len must be a positive int"):
            torchmha.KVCache(1, 1, bad_size, 4)  # type: ignore[arg-type]


def snapshot(cache: torchmha.KVCache) -> List[Tensor]:
    return [tensor.clone() for tensor in (cache.key, cache.value, cache.seq_lens)]


def assert_bitwise_unchanged(cache: torchmha.KVCache, before: Sequence[Tensor]) -> None:
    for tensor, old in zip((cache.key, cache.value, cache.seq_lens), before):
        assert torch.equal(tensor.view(torch.uint8), old.view(torch.uint8))


def test_reorder_refuses_bad_indices_and_leaves_the_cache_alone() -> None:
    attention, _ = make_pair("gqa-rope")
    cache = attention.new_kv_cache(2, 6)
    step(attention, cache, torch.randn(2, 3, EMBED_DIM, dtype=F64))
    before = snapshot(cache)
    with pytest.raises(RuntimeError, match=r"`indices` must be in \[0, 2\), but got 2"):
        cache.reorder([0, 2])
    with pytest.raises(RuntimeError, match=r"`indices` must be in \[0, 2\), but got -1"):
        cache.reorder([-1, 0])
    with pytest.raises(RuntimeError, match=r"shape \[batch_size\] = \[2\]"):
        cache.reorder([0, 1, 1])
    with pytest.raises(RuntimeError, match="integer `indices`"):
        cache.reorder(torch.tensor([0.0, 1.0]))
    assert_bitwise_unchanged(cache, before)


def module_with(**options: Any) -> torchmha.MultiHeadAttention:
    return torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, batch_first=True, dtype=F64, **options)


# name -> (a call with a cache of batch 2, max_seq_len 6, at lengths [4, 2]; its message)
Refusal = Tuple[Callable[[torchmha.MultiHeadAttention, torchmha.KVCache], Any], str]
X = torch.randn(2, 1, EMBED_DIM, dtype=F64)


def call(attention: torchmha.MultiHeadAttention, cache: Any, tokens: Tensor = X, **kwargs: Any):
    return attention(tokens, tokens, tokens, kv_cache=cache, **kwargs)


def cache_like(cache: torchmha.KVCache, **changes: Any) -> torchmha.KVCache:
    """A cache whose buffers are the given cache's, but some replaced (shape, dtype)."""
    other = torchmha.KVCache(1, 1, 1, 1)
    for name in ("key", "value", "seq_lens"):
        setattr(other, name, changes.get(name, getattr(cache, name)))
    return other


REFUSALS: Dict[str, Refusal] = {
    "past-max-seq-len": (
        lambda a, c: call(a, c, torch.randn(2, 3, EMBED_DIM, dtype=F64)),
        r"the step would pass max_seq_len 6 .*: entry 0 at length 4 with 3 new tokens needs 1 "
        r"more positions",
    ),
    "batch-mismatch": (
        lambda a, c: call(a, c, torch.randn(3, 1, EMBED_DIM, dtype=F64)),
        r"expected `cache_key` of shape \[batch, num_kv_heads, max_seq_len, head_dim\] = \[3, 2,",
    ),
    "dtype": (
        lambda a, c: call(a, cache_like(c, key=c.key.float())),
        r"expected `cache_key` to have the dtype of `query` \(Double\), but got Float",
    ),
    "device": (
        lambda a, c: call(a, cache_like(c, value=c.value.to("meta"))),
        r"expected `cache_value` on the device of `query` \(cpu\), but got meta",
    ),
    "kv-heads": (
        lambda a, c: call(a, cache_like(c, key=c.key.repeat(1, 2, 1, 1))),
        r"expected `cache_key` of shape .* = \[2, 2, max_seq_len, 6\], but got \[2, 4, 6, 6\]",
    ),
    "head-dim": (
        lambda a, c: call(a, cache_like(c, value=c.value[..., :4])),
        r"expected `cache_value` of shape .* = \[2, 2, max_seq_len, 6\], but got \[2, 2, 6, 4\]",
    ),
    "value-shape": (
        lambda a, c: call(a, cache_like(c, value=c.value[:, :, :5])),
        r"expected `cache_value` of the shape of `cache_key`",
    ),
    "lengths-dtype": (
        lambda a, c: call(a, cache_like(c, seq_lens=c.seq_lens.int())),
        r"expected int64 `cache_lengths`, but got Int",
    ),
    "negative-length": (
        lambda a, c: call(a, cache_like(c, seq_lens=torch.tensor([4, -1]))),
        r"`cache_lengths` must be non-negative, but entry 1 has length -1",
    ),
    "cross-attention": (
        lambda a, c: a(
            X,
            torch.randn(2, 3, EMBED_DIM, dtype=F64),
            torch.randn(2, 3, EMBED_DIM, dtype=F64),
            kv_cache=c,
        ),
        r"with a key/value cache and rotary embeddings, `key` and `value` are the new tokens of "
        r"self-attention",
    ),
    "cross-attention-causal": (
        lambda a, c: a(
            X,
            torch.randn(2, 3, EMBED_DIM, dtype=F64),
            torch.randn(2, 3, EMBED_DIM, dtype=F64),
            kv_cache=c,
            is_causal=True,
        ),
        r"with a key/value cache and is_causal, `key` and `value` are the new tokens of "
        r"self-attention",
    ),
    "attn-mask": (
        lambda a, c: call(a, c, attn_mask=torch.zeros(1, 1, dtype=torch.bool)),
        r"`attn_mask` cannot be used with a key/value cache",
    ),
    "positions": (
        lambda a, c: call(a, c, positions=torch.tensor([3])),
        r"`positions` cannot be used with a key/value cache",
    ),
    "float-padding": (
        lambda a, c: call(a, c, key_padding_mask=torch.zeros(2, 1, dtype=F64)),
        r"`key_padding_mask` marks right padding of the new tokens and must be bool",
    ),
    "padding-hole": (
        lambda a, c: call(
            a,
            c,
            torch.randn(2, 2, EMBED_DIM, dtype=F64),
            key_padding_mask=torch.tensor([[True, False], [False, False]]),
        ),
        r"`key_padding_mask` must be right padding",
    ),
    "not-a-cache": (
        lambda a, c: call(a, (c.key, c.value, c.seq_lens)),
        r"`kv_cache` must be a torchmha.KVCache, got tuple",
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_a_refused_step_leaves_the_cache_bitwise_unchanged(name: str) -> None:
    attention = module_with(num_kv_heads=2, rope_theta=THETA)
    cache = attention.new_kv_cache(2, 6)
    with torch.no_grad():
        step(attention, cache, torch.randn(2, 4, EMBED_DIM, dtype=F64))
    cache.seq_lens[1] = 2
    before = snapshot(cache)
    make_call, message = REFUSALS[name]
    error = TypeError if name == "not-a-cache" else RuntimeError
    with torch.no_grad(), pytest.raises(error, match=message):
        make_call(attention, cache)
    assert_bitwise_unchanged(cache, before)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"add_bias_kv": True}, "`bias_k` cannot be used with a key/value cache"),
        ({"add_zero_attn": True}, "`add_zero_attn` cannot be used with a key/value cache"),
    ],
)
def test_appended_keys_are_refused(options: Dict[str, Any], message: str) -> None:
    attention = module_with(**options)
    cache = attention.new_kv_cache(2, 4)
    before = snapshot(cache)
    with torch.no_grad(), pytest.raises(RuntimeError, match=message):
        call(attention, cache)
    assert_bitwise_unchanged(cache, before)


def test_a_cache_is_refused_under_autograd() -> None:
    attention = module_with()
    cache = attention.new_kv_cache(2, 4)
    before = snapshot(cache)
    with pytest.raises(
        RuntimeError,
        match=r"a key/value cache is for inference, but `\w+` "
        r"requires grad: run the step under torch.no_grad\(\)",
    ):
        call(attention, cache)
    assert_bitwise_unchanged(cache, before)
    with torch.inference_mode():
        cache_in_inference = attention.new_kv_cache(2, 4)
        call(attention, cache_in_inference, is_causal=True)
    assert cache_in_inference.seq_lens.tolist() == [1, 1]


def test_the_op_takes_the_cache_as_three_tensors() -> None:
    """From torchmha.multi_head_attention: all three or none, named."""
    attention = module_with()
    cache = attention.new_kv_cache(2, 4)
    weights = {
        "in_proj_weight": attention.in_proj_weight,
        "in_proj_bias": attention.in_proj_bias,
        "out_proj_weight": attention.out_proj.weight,
        "out_proj_bias": attention.out_proj.bias,
    }
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="`cache_lengths` is missing"):
            torchmha.multi_head_attention(
                X,
                X,
                X,
                NUM_HEADS,
                batch_first=True,
                cache_key=cache.key,
                cache_value=cache.value,
                **weights,
            )
        with pytest.raises(RuntimeError, match="must be different tensors"):
            torchmha.multi_head_attention(
                X,
                X,
                X,
                NUM_HEADS,
                batch_first=True,
                cache_key=cache.key,
                cache_value=cache.key,
                cache_lengths=cache.seq_lens,
                **weights,
            )
        torchmha.multi_head_attention(
            X,
            X,
            X,
            NUM_HEADS,
            batch_first=True,
            cache_key=cache.key,
            cache_value=cache.value,
            cache_lengths=cache.seq_lens,
            is_causal=True,
            **weights,
        )
    assert cache.seq_lens.tolist() == [1, 1]


def test_a_compiled_step_runs_a_whole_generation_from_one_graph() -> None:
    """torch.compile(fullgraph=True) of a decoding step (AOT autograd functionalizes the cache's
    writes): one compilation for every step, and the numbers of the full causal forward."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    attention, reference = make_pair("gqa-rope")
    sequence = torch.randn(2, 8, EMBED_DIM, dtype=F64)
    expected_output, _ = full_causal(reference, sequence)
    cache = attention.new_kv_cache(2, 8)
    step(attention, cache, sequence[:, :3])
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def decode(tokens: Tensor) -> Tensor:
        return attention(
            tokens, tokens, tokens, kv_cache=cache, is_causal=True, need_weights=False
        )[0]

    with torch.no_grad():
        for position in range(3, 8):
            output = decode(sequence[:, position : position + 1].clone())
            torch.testing.assert_close(
                output, expected_output[:, position : position + 1], **TOLERANCE
            )
    assert cache.seq_lens.tolist() == [8, 8]
    assert counter.frame_count == 1
    # The graph cannot read the lengths ahead as eager calls do; it asserts them as it runs.
    before = snapshot(cache)
    with torch.no_grad(), pytest.raises(RuntimeError, match="the step would pass max_seq_len"):
        decode(sequence[:, :1].clone())
    assert_bitwise_unchanged(cache, before)
    assert counter.frame_count == 1


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|trace)` is deprecated")
def test_torchscript_refuses_a_cache_rather_than_ignoring_it() -> None:
    attention = module_with(num_kv_heads=2)
    scripted = torch.jit.script(attention)
    cache = attention.new_kv_cache(2, 4)
    before = snapshot(cache)
    # The scripted raise surfaces as torch.jit.Error, which carries the message.
    with torch.no_grad(), pytest.raises(torch.jit.Error, match="`kv_cache` is not supported"):
        scripted(X, X, X, kv_cache=(cache.key, cache.value, cache.seq_lens))
    assert_bitwise_unchanged(cache, before)


@pytest.mark.parametrize("need_weights", [False, True])
def test_opcheck_of_a_step_with_a_cache(need_weights: bool) -> None:
    """torch.library.opcheck of a prefill with a cache (ragged lengths, right padding, grouped
    heads, rotary): the op writes only the arguments its schema marks mutable (`(a!)`), and its
    fake-tensor and AOT-dispatch (functionalized, dynamic shapes) results equal eager's."""
    attention, _ = make_pair("gqa-rope")
    cache = attention.new_kv_cache(2, 8)
    with torch.no_grad():
        cache.key.normal_()
        cache.value.normal_()
        cache.seq_lens.copy_(torch.tensor([3, 1]))
    tokens = torch.randn(2, 2, EMBED_DIM, dtype=F64)
    in_proj = (attention.in_proj_weight.detach(), attention.in_proj_bias.detach(), None, None, None)
    result = torch.library.opcheck(
        torch.ops.torchmha.multi_head_attention.default,
        (tokens, tokens, tokens, NUM_HEADS, *in_proj),
        {
            "out_proj_weight": attention.out_proj.weight.detach(),
            "out_proj_bias": attention.out_proj.bias.detach(),
            "key_padding_mask": torch.tensor([[False, False], [False, True]]),
            "need_weights": need_weights,
            "is_causal": True,
            "batch_first": True,
            "num_kv_heads": attention.num_kv_heads,
            "rope_theta": attention.rope_theta,
            "cache_key": cache.key,
            "cache_value": cache.value,
            "cache_lengths": cache.seq_lens,
        },
    )
    assert set(result.values()) == {"SUCCESS"}, result


def test_a_cache_of_strided_tensors_is_written_as_a_contiguous_one() -> None:
    """The op writes contiguous caches as rows and any other strided cache by scatter: both give
    the same cache and the same outputs."""
    attention, _ = make_pair("gqa-rope")
    contiguous = attention.new_kv_cache(2, 6)
    strided = torchmha.KVCache(2, 2, 6, 6, dtype=F64)
    # (N, KV, head_dim, max_seq_len) storage seen as (N, KV, max_seq_len, head_dim).
    strided.key = torch.zeros(2, 2, 6, 6, dtype=F64).transpose(2, 3)
    strided.value = torch.zeros(2, 2, 6, 6, dtype=F64).transpose(2, 3)
    assert not strided.key.is_contiguous()
    for tokens in (
        torch.randn(2, 3, EMBED_DIM, dtype=F64),
        torch.randn(2, 1, EMBED_DIM, dtype=F64),
    ):
        expected, _ = step(attention, contiguous, tokens, need_weights=False)
        output, _ = step(attention, strided, tokens, need_weights=False)
        torch.testing.assert_close(output, expected, **TOLERANCE)
    for name in ("key", "value", "seq_lens"):
        torch.testing.assert_close(getattr(strided, name), getattr(contiguous, name), **TOLERANCE)
