"""The pybind11-bound C++ modules (``torchmha.cpp``) against PyTorch and the chapter's module."""

from typing import Any, Dict, Tuple

import pytest
import torch
from conftest import (
    assert_close,
    assert_parity,
    random_bool_masks,
    randomize_parameters,
    sequence_first,
)
from torch import nn

import torchmha
from torchmha.testing import ChapterMultiHeadAttention

EMBED_DIM, NUM_HEADS, BATCH = 8, 2, 3

CONFIGS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "kdim_vdim": {"kdim": 5, "vdim": 6},
}


def make_cpp_pair(
    dtype: torch.dtype = torch.float64, **kwargs: Any
) -> Tuple[nn.MultiheadAttention, torchmha.cpp.MultiHeadAttention]:
    """A random PyTorch module and the C++ module, converted to ``dtype``, loaded from it."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, dtype=dtype, **kwargs)
    randomize_parameters(reference)
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **kwargs)
    candidate.to(dtype)
    candidate.load_state_dict(reference.state_dict(), strict=True)
    return reference, candidate


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_state_dict_keys_and_shapes_equal_pytorch(config: Dict[str, Any]) -> None:
    """The C++ parameters carry PyTorch's state-dict names and shapes."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, **config)
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **config)
    expected = {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in candidate.state_dict().items()} == expected


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_state_dict_loads_both_ways(config: Dict[str, Any]) -> None:
    """PyTorch's state dict loads strictly into the C++ module, and the C++ one into PyTorch."""
    reference, candidate = make_cpp_pair(torch.float32, **config)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(candidate.state_dict()[name], tensor), name

    randomize_parameters(candidate)
    target = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, **config)
    target.load_state_dict(candidate.state_dict(), strict=True)
    for name, tensor in candidate.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_load_state_dict_reports_missing_key() -> None:
    """Strict loading names a key the state dict lacks."""
    state = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS).state_dict()
    del state["in_proj_bias"]
    with pytest.raises(RuntimeError, match='Missing key.*"in_proj_bias"'):
        torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS).load_state_dict(state)


def test_load_state_dict_reports_unexpected_key() -> None:
    """Strict loading names a key the module does not have."""
    state = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, add_bias_kv=True).state_dict()
    with pytest.raises(RuntimeError, match='Unexpected key.*"bias_k"'):
        torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS).load_state_dict(state)


def test_load_state_dict_non_strict_ignores_extra_key() -> None:
    """``strict=False`` reports the extra key instead of raising, and still loads the rest."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS)
    randomize_parameters(reference)
    state = dict(reference.state_dict(), extra=torch.zeros(1))
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS)
    result = candidate.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["extra"] and result.missing_keys == []
    assert torch.equal(candidate.state_dict()["out_proj.weight"], reference.out_proj.weight)


@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "attn_3d_bool", "attn_2d_float"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_forward_and_gradients_match_pytorch(
    batch_first: bool, need_weights: bool, mask_kind: str, dtype: torch.dtype
) -> None:
    """Outputs, weights and every input and parameter gradient equal PyTorch's."""
    reference, candidate = make_cpp_pair(dtype, batch_first=batch_first)
    query = sequence_first(BATCH, 4, EMBED_DIM, batch_first, dtype)
    key = sequence_first(BATCH, 6, EMBED_DIM, batch_first, dtype)
    value = sequence_first(BATCH, 6, EMBED_DIM, batch_first, dtype)
    key_padding, attn_2d, attn_3d = random_bool_masks(BATCH, 4, 6, BATCH * NUM_HEADS)
    masks = {
        "none": {},
        "key_padding": {"key_padding_mask": key_padding},
        "attn_3d_bool": {"attn_mask": attn_3d},
        "attn_2d_float": {"attn_mask": torch.randn(4, 6, dtype=dtype)},
    }[mask_kind]
    assert_parity(reference, candidate, (query, key, value), need_weights=need_weights, **masks)


@pytest.mark.parametrize("need_weights", [True, False])
def test_self_attention_matches_pytorch(need_weights: bool) -> None:
    """One tensor as query, key and value (the C++ packed-projection path)."""
    reference, candidate = make_cpp_pair()
    query = sequence_first(BATCH, 5, EMBED_DIM, False, torch.float64)
    assert_parity(reference, candidate, (query, query, query), need_weights=need_weights)


def test_train_and_eval_toggle_training() -> None:
    """``.train()``/``.eval()`` reach the C++ module, and eval mode switches dropout off."""
    reference, candidate = make_cpp_pair(dropout=0.5)
    assert candidate.training and candidate.cpp_module.training
    candidate.eval()
    assert not candidate.training and not candidate.cpp_module.training
    reference.eval()
    query = sequence_first(BATCH, 4, EMBED_DIM, False, torch.float64)
    assert_parity(reference, candidate, (query, query, query))
    candidate.train()
    assert candidate.training and candidate.cpp_module.training


def test_to_train_and_eval_return_the_module() -> None:
    """As on ``nn.Module``, ``.to()``, ``.train()`` and ``.eval()`` return the module."""
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS)
    assert candidate.to(torch.float64) is candidate
    assert candidate.eval() is candidate
    assert candidate.train() is candidate


def test_zero_grad_accepts_set_to_none() -> None:
    """``zero_grad(set_to_none=True)``, as on ``nn.Module``, clears the gradients."""
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS)
    query = torch.randn(4, BATCH, EMBED_DIM)
    candidate(query, query, query)[0].sum().backward()
    candidate.zero_grad(set_to_none=True)
    assert all(parameter.grad is None for parameter in candidate.parameters())


def test_to_float64_converts_parameters() -> None:
    """``.to(torch.float64)`` converts the C++ module's own tensors, and forward then runs in it."""
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, add_bias_kv=True)
    assert all(p.dtype == torch.float32 for p in candidate.parameters())
    candidate.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in candidate.parameters())
    assert all(p.dtype == torch.float64 for p in candidate.cpp_module.parameters())
    query = torch.randn(4, BATCH, EMBED_DIM, dtype=torch.float64)
    output, weights = candidate(query, query, query)
    assert output.dtype == torch.float64 and weights.dtype == torch.float64


def test_parameters_are_visible_tensors() -> None:
    """``parameters()``/``named_parameters()`` list PyTorch's names, as trainable tensors."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, kdim=5, vdim=6)
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, kdim=5, vdim=6)
    named = dict(candidate.named_parameters())
    assert named.keys() == dict(reference.named_parameters()).keys()
    assert len(list(candidate.parameters())) == len(named)
    for name, parameter in named.items():
        assert isinstance(parameter, torch.Tensor) and parameter.requires_grad, name
    # An optimizer step through parameters() must change the C++ module's own weights.
    before = named["q_proj_weight"].detach().clone()
    optimizer = torch.optim.SGD(candidate.parameters(), lr=0.1)
    query = torch.randn(4, BATCH, EMBED_DIM)
    key = torch.randn(6, BATCH, 5)
    value = torch.randn(6, BATCH, 6)
    candidate(query, key, value)[0].square().sum().backward()
    optimizer.step()
    assert not torch.equal(candidate.state_dict()["q_proj_weight"], before)


def test_repr_names_the_cpp_module() -> None:
    """The repr is the C++ ``pretty_print``."""
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, batch_first=True)
    assert "torchmha::MultiHeadAttention" in repr(candidate)
    assert "embed_dim=8" in repr(candidate) and "num_heads=2" in repr(candidate)


def make_chapter_module(h: int = NUM_HEADS, d_model: int = EMBED_DIM) -> ChapterMultiHeadAttention:
    """The chapter's module with random weights, in eval mode (its dropout is the identity)."""
    chapter = ChapterMultiHeadAttention(h, d_model).double().eval()
    randomize_parameters(chapter)
    return chapter


def chapter_inputs() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-first cross-attention inputs ``(B, L, d)``, ``(B, S, d)``, ``(B, S, d)``."""
    return tuple(torch.randn(BATCH, length, EMBED_DIM, dtype=torch.float64) for length in (4, 6, 6))


def test_cpp_textbook_state_dict_and_repr() -> None:
    """The bound textbook module has the chapter's state-dict keys and a C++ repr."""
    candidate = torchmha.cpp.TextbookMultiHeadAttention(NUM_HEADS, EMBED_DIM)
    expected = {name: tuple(t.shape) for name, t in make_chapter_module().state_dict().items()}
    assert {name: tuple(t.shape) for name, t in candidate.state_dict().items()} == expected
    assert "torchmha::TextbookMultiHeadAttention" in repr(candidate)


def test_cpp_textbook_matches_chapter() -> None:
    """The bound textbook module loads the chapter's state dict and gives its output and attn."""
    chapter = make_chapter_module()
    candidate = torchmha.cpp.TextbookMultiHeadAttention(NUM_HEADS, EMBED_DIM)
    candidate.to(torch.float64)
    candidate.load_state_dict(chapter.state_dict(), strict=True)
    candidate.eval()
    inputs = chapter_inputs()
    mask = torch.ones(BATCH, 1, 4, 6, dtype=torch.int64).tril()
    assert_close(candidate(*inputs, mask=mask), chapter(*inputs, mask=mask))
    assert_close(candidate.attn, chapter.attn)


def test_bound_cpp_textbook_object_matches_chapter() -> None:
    """The raw ``torchmha._C`` textbook object (under the broken wrapper) computes the chapter.

    Checks the C++ module's numbers independently of ``torchmha.cpp``'s wrapper bug.
    """
    chapter = make_chapter_module()
    bound = torchmha._C.TextbookMultiHeadAttention(NUM_HEADS, EMBED_DIM, 0.1)
    bound.double()
    bound.eval()
    parameters = bound.named_parameters()
    assert sorted(parameters.keys()) == sorted(chapter.state_dict().keys())
    with torch.no_grad():
        for name, tensor in chapter.state_dict().items():
            parameters[name].copy_(tensor)
    inputs = chapter_inputs()
    mask = torch.ones(BATCH, 1, 4, 6, dtype=torch.int64).tril()
    assert_close(bound.forward(*inputs, mask=mask), chapter(*inputs, mask=mask))
    assert_close(bound.attn, chapter.attn)
    assert "torchmha::TextbookMultiHeadAttention" in bound.pretty_print()
