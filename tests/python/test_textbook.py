"""``torchmha.TextbookMultiHeadAttention`` against the chapter's published module."""

from typing import Optional, Tuple

import pytest
import torch
from conftest import assert_close, fresh_leaves, randomize_parameters
from torch import Tensor, nn

import torchmha
from torchmha.testing import ChapterMultiHeadAttention, textbook_to_pytorch

HEADS, D_MODEL, BATCH, TARGET_LEN = 2, 8, 3, 4


def make_textbook_pair(
    dtype: torch.dtype = torch.float64, dropout: float = 0.1
) -> Tuple[ChapterMultiHeadAttention, torchmha.TextbookMultiHeadAttention]:
    """The chapter's module with random weights and torchmha's loaded from it, both in eval."""
    chapter = ChapterMultiHeadAttention(HEADS, D_MODEL, dropout).to(dtype)
    randomize_parameters(chapter)
    textbook = torchmha.TextbookMultiHeadAttention(HEADS, D_MODEL, dropout).to(dtype)
    textbook.load_state_dict(chapter.state_dict(), strict=True)
    return chapter.eval(), textbook.eval()


def chapter_inputs(kind: str, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch-first (query, key, value); ``cross`` has a source of another length than the target."""
    query = torch.randn(BATCH, TARGET_LEN, D_MODEL, dtype=dtype)
    if kind == "self":
        return query, query, query
    key = torch.randn(BATCH, 6, D_MODEL, dtype=dtype)
    return query, key, torch.randn(BATCH, 6, D_MODEL, dtype=dtype)


def chapter_mask(kind: str, source_len: int) -> Optional[Tensor]:
    """The chapter's masks (nonzero = may attend); none leaves a query row without keys."""
    if kind == "none":
        return None
    if kind.startswith("causal"):
        # (B, 1, L, S) lower-triangular: query i sees keys 0..i.
        causal = torch.ones(BATCH, 1, TARGET_LEN, source_len, dtype=torch.int64).tril()
        return causal.bool() if kind == "causal_bool" else causal
    # (B, 1, 1, S) padding: each batch entry has its own valid length, at least 1.
    lengths = torch.randint(1, source_len + 1, (BATCH,))
    return (torch.arange(source_len) < lengths[:, None]).to(torch.int64)[:, None, None, :]


def test_state_dict_keys_and_shapes_equal_the_chapter() -> None:
    """Parameters carry the chapter's names (``linear_layers.i``, ``output_linear``)."""
    chapter = ChapterMultiHeadAttention(HEADS, D_MODEL)
    textbook = torchmha.TextbookMultiHeadAttention(HEADS, D_MODEL)
    expected = {name: tuple(tensor.shape) for name, tensor in chapter.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in textbook.state_dict().items()} == expected


def test_state_dict_loads_both_ways() -> None:
    """A state dict moves strictly between the chapter's module and torchmha's, unchanged."""
    chapter, textbook = make_textbook_pair()
    for name, tensor in chapter.state_dict().items():
        assert torch.equal(textbook.state_dict()[name], tensor), name

    randomize_parameters(textbook)
    chapter.load_state_dict(textbook.state_dict(), strict=True)
    for name, tensor in textbook.state_dict().items():
        assert torch.equal(chapter.state_dict()[name], tensor), name


@pytest.mark.parametrize("mask_kind", ["none", "causal_int", "causal_bool", "padding"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_output_attn_and_gradients_match_the_chapter(
    kind: str, mask_kind: str, dtype: torch.dtype
) -> None:
    """Eval mode: output, per-head ``attn`` and every gradient equal the chapter's."""
    chapter, textbook = make_textbook_pair(dtype)
    inputs = chapter_inputs(kind, dtype)
    mask = chapter_mask(mask_kind, inputs[1].size(1))
    cotangent = torch.randn(BATCH, TARGET_LEN, D_MODEL, dtype=dtype)
    attn_cotangent = torch.randn(BATCH, HEADS, TARGET_LEN, inputs[1].size(1), dtype=dtype)

    results = []
    for module in (chapter, textbook):
        leaves = fresh_leaves(inputs)
        output = module(*leaves, mask=mask)
        # The kept probabilities are differentiable in both; backprop through them as well.
        ((output * cotangent).sum() + (module.attn * attn_cotangent).sum()).backward()
        results.append((output, module.attn, leaves, dict(module.named_parameters())))
    (expected, expected_attn, expected_leaves, expected_params) = results[0]
    (actual, actual_attn, actual_leaves, actual_params) = results[1]

    assert_close(actual, expected)
    assert actual_attn.shape == (BATCH, HEADS, TARGET_LEN, inputs[1].size(1))
    assert_close(actual_attn, expected_attn)
    for actual_leaf, expected_leaf in zip(actual_leaves, expected_leaves):
        assert_close(actual_leaf.grad, expected_leaf.grad)
    assert actual_params.keys() == expected_params.keys()
    for name, parameter in expected_params.items():
        assert_close(actual_params[name].grad, parameter.grad)


def test_training_dropout_matches_the_chapter_with_same_seed() -> None:
    """In training mode both drop the same probabilities when seeded alike.

    Both draw one Bernoulli mask over the (B, h, L, S) probabilities from the global generator.
    """
    chapter, textbook = make_textbook_pair(dropout=0.5)
    chapter.train()
    textbook.train()
    inputs = chapter_inputs("cross", torch.float64)
    torch.manual_seed(1)
    expected = chapter(*inputs)
    torch.manual_seed(1)
    actual = textbook(*inputs)
    assert_close(actual, expected)
    assert_close(textbook.attn, chapter.attn)
    # Guards against a vacuous pass: some probabilities were dropped.
    assert (textbook.attn == 0).any()


def test_fully_masked_query_attends_to_nothing() -> None:
    """Deliberate difference: a query with no visible key gives ``output_linear.bias`` and zero
    ``attn`` (the chapter's ``-1e9`` fill spreads it uniformly over the masked keys instead)."""
    _, textbook = make_textbook_pair()
    inputs = chapter_inputs("cross", torch.float64)
    mask = torch.ones(BATCH, 1, TARGET_LEN, 6, dtype=torch.int64)
    mask[:, :, 2] = 0
    output = textbook(*inputs, mask=mask)
    bias = textbook.output_linear.bias.detach()
    assert_close(output.detach()[:, 2], bias.expand(BATCH, -1))
    assert textbook.attn is not None and not textbook.attn[:, :, 2].any()
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_weights_convert_to_pytorch_multihead_attention(
    kind: str, causal: bool, dtype: torch.dtype
) -> None:
    """Stacked q/k/v weights, concatenated biases and ``output_linear`` -> ``out_proj`` give
    ``nn.MultiheadAttention(batch_first=True)`` the same output."""
    _, textbook = make_textbook_pair(dtype)
    pytorch = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True, dtype=dtype)
    pytorch.load_state_dict(textbook_to_pytorch(textbook.state_dict()), strict=True)
    inputs = chapter_inputs(kind, dtype)
    source_len = inputs[1].size(1)
    mask = chapter_mask("causal_bool", source_len) if causal else None
    # PyTorch's attn_mask is True where attention is NOT allowed.
    attn_mask = ~mask[0, 0] if mask is not None else None
    expected, _ = pytorch(*inputs, attn_mask=attn_mask, need_weights=False)
    assert_close(textbook(*inputs, mask=mask), expected)


def test_cpp_textbook_module_is_interchangeable() -> None:
    """``torchmha.cpp.TextbookMultiHeadAttention`` loads the same state dict, same numbers."""
    _, textbook = make_textbook_pair()
    bound = torchmha.cpp.TextbookMultiHeadAttention(HEADS, D_MODEL)
    bound.to(torch.float64)
    bound.load_state_dict(textbook.state_dict(), strict=True)
    bound.eval()
    inputs = chapter_inputs("cross", torch.float64)
    mask = chapter_mask("padding", 6)
    assert_close(bound(*inputs, mask=mask), textbook(*inputs, mask=mask))
    assert_close(bound.attn, textbook.attn)


@pytest.mark.parametrize("mask_kind", ["none", "causal_int", "padding"])
def test_bound_cpp_textbook_object_is_interchangeable(mask_kind: str) -> None:
    """The raw ``torchmha._C`` textbook object (under the broken wrapper) computes the same.

    An interchangeability check of the two entry points; parity with the chapter is above.
    """
    _, textbook = make_textbook_pair()
    bound = torchmha._C.TextbookMultiHeadAttention(HEADS, D_MODEL, 0.1)
    bound.double()
    bound.eval()
    parameters = bound.named_parameters()
    with torch.no_grad():
        for name, tensor in textbook.state_dict().items():
            parameters[name].copy_(tensor)
    inputs = chapter_inputs("cross", torch.float64)
    mask = chapter_mask(mask_kind, 6)
    assert_close(bound.forward(*inputs, mask=mask), textbook(*inputs, mask=mask))
    assert_close(bound.attn, textbook.attn)
