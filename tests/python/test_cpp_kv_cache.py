"""The C++ key/value cache from Python (``torchmha.cpp.KVCache``, the bound ``torchmha::KVCache``):
the bound C++ module decoding with it computes what the Python module computes with
``torchmha.KVCache`` (same weights, float64, bitwise: both run the one op on the same tensors),
through prefills, single steps, chunks, ragged prompts, ``reorder`` and ``reset``; ``.to()``,
the state dict and the repr; and each module refuses the other's cache with a ``TypeError``.
"""

import copy
import pickle
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from conftest import randomize_parameters
from torch import Tensor

import torchmha

F64 = torch.float64
EMBED_DIM, NUM_HEADS, BATCH, MAX_SEQ_LEN = 16, 4, 3, 12

CONFIGS: Dict[str, Dict[str, Any]] = {
    "mha": {},
    "grouped_rotary": {"num_kv_heads": 2, "rope_theta": 100.0},
    "multi_query_rotary_partial_interleaved_no_bias": {
        "num_kv_heads": 1,
        "rope_theta": 100.0,
        "rotary_dim": 2,
        "rotary_interleaved": True,
        "bias": False,
    },
    "grouped_rotary_sequence_first": {"num_kv_heads": 2, "rope_theta": 100.0},
}

Pair = Tuple[torchmha.MultiHeadAttention, torchmha.cpp.MultiHeadAttention]


def make_pair(**options: Any) -> Pair:
    """A random float64 Python module and the C++ module loaded from its state dict."""
    options.setdefault("batch_first", True)
    python_module = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, dtype=F64, **options)
    randomize_parameters(python_module)
    cpp_module = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **options).to(F64)
    cpp_module.load_state_dict(python_module.state_dict(), strict=True)
    return python_module, cpp_module


def config_options(name: str) -> Dict[str, Any]:
    return {**CONFIGS[name], "batch_first": not name.endswith("sequence_first")}


def step(module: Any, cache: Any, tokens: Tensor, **kwargs: Any) -> Tuple[Tensor, Optional[Tensor]]:
    """One decoding step on batch-first (N, L, E) tokens, in the module's layout."""
    if not module.batch_first:
        tokens = tokens.transpose(0, 1)
    kwargs.setdefault("is_causal", True)
    with torch.no_grad():
        output, weights = module(tokens, tokens, tokens, kv_cache=cache, **kwargs)
    return (output if module.batch_first else output.transpose(0, 1)), weights


def assert_same_step(pair: Pair, caches: Tuple[Any, Any], tokens: Tensor, **kwargs: Any) -> None:
    """The step's outputs, weights and the caches' tensors afterwards are bitwise equal."""
    python_result = step(pair[0], caches[0], tokens, **kwargs)
    cpp_result = step(pair[1], caches[1], tokens, **kwargs)
    for python_tensor, cpp_tensor in zip(python_result, cpp_result):
        assert (python_tensor is None) == (cpp_tensor is None)
        if python_tensor is not None:
            assert torch.equal(cpp_tensor, python_tensor)
    assert_same_cache(*caches)


def assert_same_cache(python_cache: torchmha.KVCache, cpp_cache: torchmha.cpp.KVCache) -> None:
    for name in ("key", "value", "seq_lens"):
        python_tensor, cpp_tensor = getattr(python_cache, name), getattr(cpp_cache, name)
        assert cpp_tensor.dtype == python_tensor.dtype, name
        assert torch.equal(cpp_tensor, python_tensor), name


def new_caches(pair: Pair, batch_size: int = BATCH) -> Tuple[Any, Any]:
    return pair[0].new_kv_cache(batch_size, MAX_SEQ_LEN), pair[1].new_kv_cache(
        batch_size, MAX_SEQ_LEN
    )


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("weights", ["none", "averaged", "per-head"])
def test_cpp_module_decoding_with_its_cache_equals_python_module_with_python_cache(
    config: str, weights: str
) -> None:
    """A prefill, single steps, a chunk and another single step."""
    pair = make_pair(**config_options(config))
    caches = new_caches(pair)
    assert isinstance(caches[1], torchmha.cpp.KVCache)
    sequence = torch.randn(BATCH, 10, EMBED_DIM, dtype=F64)
    options = {"need_weights": weights != "none", "average_attn_weights": weights == "averaged"}
    start = 0
    for length in (4, 1, 1, 3, 1):
        assert_same_step(pair, caches, sequence[:, start : start + length], **options)
        start += length
    assert caches[1].seq_lens.tolist() == [start] * BATCH


def test_ragged_prefill_advances_each_cpp_entry_by_its_real_length() -> None:
    """Right-padded prompts (``key_padding_mask``): entries at different lengths decode on."""
    pair = make_pair(**config_options("grouped_rotary"))
    caches = new_caches(pair)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    prompt = torch.randn(BATCH, 5, EMBED_DIM, dtype=F64)
    assert_same_step(pair, caches, prompt, key_padding_mask=padding, need_weights=False)
    assert caches[1].seq_lens.tolist() == [5, 3, 4]
    for _ in range(3):
        assert_same_step(pair, caches, torch.randn(BATCH, 1, EMBED_DIM, dtype=F64))
    assert caches[1].seq_lens.tolist() == [8, 6, 7]


@pytest.mark.parametrize("indices", [[2, 0, 0], torch.tensor([1, 1, 2], dtype=torch.int32)])
def test_reorder_through_the_binding_equals_python_reorder(indices: Any) -> None:
    """Beam search: entries selected and repeated in place, then decoding goes on."""
    pair = make_pair(**config_options("grouped_rotary"))
    caches = new_caches(pair)
    assert_same_step(pair, caches, torch.randn(BATCH, 3, EMBED_DIM, dtype=F64))
    caches[1].seq_lens[0] = 1  # entries at different lengths, so the lengths move too
    caches[0].seq_lens[0] = 1
    for cache in caches:
        cache.reorder(indices)
    assert_same_cache(*caches)
    assert_same_step(pair, caches, torch.randn(BATCH, 2, EMBED_DIM, dtype=F64))


def test_reorder_errors_come_from_the_cpp_cache_and_leave_it_unchanged() -> None:
    cache = torchmha.cpp.KVCache(2, 1, 4, 2, dtype=F64)
    cache.seq_lens.copy_(torch.tensor([1, 3]))
    before = [tensor.clone() for tensor in (cache.key, cache.value, cache.seq_lens)]
    with pytest.raises(RuntimeError, match=r"`indices` must be in \[0, 2\), but got 2"):
        cache.reorder([0, 2])
    with pytest.raises(RuntimeError, match=r"expected integer `indices` of shape \[batch_size\]"):
        cache.reorder([0])
    for tensor, old in zip((cache.key, cache.value, cache.seq_lens), before):
        assert torch.equal(tensor, old)


def test_reset_through_the_binding_empties_the_cache_in_place() -> None:
    pair = make_pair(**config_options("grouped_rotary"))
    caches = new_caches(pair)
    assert_same_step(pair, caches, torch.randn(BATCH, 4, EMBED_DIM, dtype=F64))
    key = caches[1].key
    caches[1].reset()
    assert caches[1].key is key  # in place: the C++ cache's own tensors
    for tensor in (caches[1].key, caches[1].value, caches[1].seq_lens):
        assert not tensor.any()
    # After a reset the C++ cache decodes as a new Python cache does.
    fresh = (pair[0].new_kv_cache(BATCH, MAX_SEQ_LEN), caches[1])
    assert_same_step(pair, fresh, torch.randn(BATCH, 2, EMBED_DIM, dtype=F64))


def test_constructed_from_sizes_as_the_python_cache() -> None:
    cpp_cache = torchmha.cpp.KVCache(2, 3, 5, 4, dtype=F64, device="cpu")
    python_cache = torchmha.KVCache(2, 3, 5, 4, dtype=F64, device="cpu")
    assert_same_cache(python_cache, cpp_cache)
    sizes = (cpp_cache.batch_size, cpp_cache.num_kv_heads, cpp_cache.max_seq_len)
    assert sizes + (cpp_cache.head_dim,) == (2, 3, 5, 4)
    assert repr(cpp_cache) == (
        "torchmha::KVCache(batch_size=2, num_kv_heads=3, max_seq_len=5, head_dim=4, dtype=Double)"
    )
    # Decoding state, not weights: buffers outside the state dict, as the Python cache's.
    assert [name for name, _ in cpp_cache.named_buffers()] == ["key", "value", "seq_lens"]
    assert list(cpp_cache.state_dict()) == list(python_cache.state_dict()) == []


def test_default_dtype_is_pythons_default_dtype() -> None:
    assert torchmha.cpp.KVCache(1, 1, 2, 2).key.dtype == torch.get_default_dtype()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        cpp_cache = torchmha.cpp.KVCache(1, 1, 2, 2)
        assert cpp_cache.key.dtype == torchmha.KVCache(1, 1, 2, 2).key.dtype == F64
    finally:
        torch.set_default_dtype(previous)
    assert cpp_cache.seq_lens.dtype == torch.int64


@pytest.mark.parametrize("size", ["batch_size", "num_kv_heads", "max_seq_len", "head_dim"])
def test_a_size_that_is_not_positive_is_a_value_error(size: str) -> None:
    sizes = {"batch_size": 1, "num_kv_heads": 1, "max_seq_len": 2, "head_dim": 2, size: 0}
    with pytest.raises(ValueError, match=f"`{size}` must be positive, got 0"):
        torchmha.cpp.KVCache(**sizes)


def test_new_kv_cache_follows_the_weights_unless_told() -> None:
    cpp_module = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, num_kv_heads=2)
    cache = cpp_module.new_kv_cache(2, 7)
    assert cache.key.shape == cache.value.shape == (2, 2, 7, EMBED_DIM // NUM_HEADS)
    assert cache.key.dtype == torch.float32 and cache.seq_lens.dtype == torch.int64
    assert cpp_module.to(F64).new_kv_cache(1, 3).key.dtype == F64
    told = cpp_module.new_kv_cache(1, 3, dtype=torch.float32, device="cpu")
    assert told.key.dtype == torch.float32 and told.key.device == torch.device("cpu")


def test_to_converts_the_cpp_tensors_in_place_and_keeps_lengths_int64() -> None:
    """``.to()`` gives the C++ cache's own tensors new data: the C++ module then decodes with
    the converted cache (it reads the C++ members, not the Python buffers)."""
    pair = make_pair(**config_options("grouped_rotary"))
    cpp_cache = pair[1].new_kv_cache(BATCH, MAX_SEQ_LEN, dtype=torch.float32)
    key = cpp_cache.key
    assert cpp_cache.to(F64) is cpp_cache
    assert cpp_cache.key is key and key.dtype == F64
    assert cpp_cache.value.dtype == F64 and cpp_cache.seq_lens.dtype == torch.int64
    caches = (pair[0].new_kv_cache(BATCH, MAX_SEQ_LEN), cpp_cache)
    assert_same_step(pair, caches, torch.randn(BATCH, 3, EMBED_DIM, dtype=F64))
    cpp_cache.half()
    assert cpp_cache.key.dtype == torch.float16 and cpp_cache.seq_lens.tolist() == [3] * BATCH


def test_a_cache_owned_by_a_python_module_moves_with_it() -> None:
    """The C++ cache is an nn.Module: a model that owns one converts it with itself."""
    owner = torch.nn.Module()
    owner.cache = torchmha.cpp.KVCache(1, 1, 2, 2)
    owner.to(F64)
    assert owner.cache.key.dtype == F64 and owner.cache.seq_lens.dtype == torch.int64
    assert [name for name, _ in owner.named_buffers()] == [
        "cache.key",
        "cache.value",
        "cache.seq_lens",
    ]


@pytest.mark.parametrize("copy_kind", ["deepcopy", "pickle"])
def test_copies_hold_their_own_cpp_tensors_and_decode_on(copy_kind: str) -> None:
    """``copy.deepcopy``, ``pickle`` (and so ``torch.save``) rebuild the C++ cache from its
    tensors: a copy decodes on as the original, and neither sees the other's writes."""
    pair = make_pair(**config_options("grouped_rotary"))
    caches = new_caches(pair)
    assert_same_step(pair, caches, torch.randn(BATCH, 3, EMBED_DIM, dtype=F64))
    copied = copy.deepcopy(caches[1]) if copy_kind == "deepcopy" else pickled(caches[1])
    assert isinstance(copied, torchmha.cpp.KVCache) and copied.cpp_cache is not caches[1].cpp_cache
    assert_same_cache(caches[0], copied)
    python_copy = copy.deepcopy(caches[0])
    tokens = torch.randn(BATCH, 1, EMBED_DIM, dtype=F64)
    assert_same_step(pair, (python_copy, copied), tokens)
    assert caches[1].seq_lens.tolist() == [3] * BATCH  # the original is unchanged
    assert_same_step(pair, caches, tokens)
    assert_same_cache(caches[0], copied)


def pickled(cache: torchmha.cpp.KVCache) -> torchmha.cpp.KVCache:
    return pickle.loads(pickle.dumps(cache))


CROSSED: Dict[str, Tuple[str, str]] = {
    "python-cache-to-cpp-module": (
        "cpp",
        r"torchmha.cpp.MultiHeadAttention: `kv_cache` must be a torchmha.cpp.KVCache \(from its "
        r"new_kv_cache\), got torchmha.kv_cache.KVCache",
    ),
    "cpp-cache-to-python-module": (
        "python",
        r"torchmha.MultiHeadAttention: `kv_cache` must be a torchmha.KVCache, got "
        r"torchmha.cpp.KVCache",
    ),
}


@pytest.mark.parametrize("name", list(CROSSED))
def test_each_module_refuses_the_other_languages_cache_with_a_type_error(name: str) -> None:
    pair = make_pair(**config_options("grouped_rotary"))
    caches = new_caches(pair)
    before = [tensor.clone() for cache in caches for tensor in cache.buffers()]
    module_name, message = CROSSED[name]
    module, cache = (pair[1], caches[0]) if module_name == "cpp" else (pair[0], caches[1])
    with pytest.raises(TypeError, match=message):
        step(module, cache, torch.randn(BATCH, 2, EMBED_DIM, dtype=F64))
    after: List[Tensor] = [tensor for cache in caches for tensor in cache.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_cpp_module_refuses_something_else_as_a_cache() -> None:
    _, cpp_module = make_pair()
    tokens = torch.randn(BATCH, 1, EMBED_DIM, dtype=F64)
    with pytest.raises(TypeError, match=r"must be a torchmha.cpp.KVCache .*, got tuple"):
        step(cpp_module, (tokens,), tokens)


def test_cpp_module_refuses_a_cache_in_grad_mode_before_writing() -> None:
    """A cache is for inference: with parameters that require grad, grad mode is refused."""
    _, cpp_module = make_pair()
    cache = cpp_module.new_kv_cache(BATCH, MAX_SEQ_LEN)
    tokens = torch.randn(BATCH, 2, EMBED_DIM, dtype=F64)
    with pytest.raises(RuntimeError, match="torchmha.multi_head_attention: "):
        cpp_module(tokens, tokens, tokens, kv_cache=cache, is_causal=True)
    assert not cache.seq_lens.any() and not cache.key.any()
