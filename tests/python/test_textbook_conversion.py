"""The textbook adapter's weights convert to and from ``torch.nn.MultiheadAttention``'s exactly.

``linear_layers.0/1/2.weight`` are the row blocks of ``in_proj_weight`` (query, key, value), their
biases the chunks of ``in_proj_bias``, and ``output_linear`` is ``out_proj``. ``test_textbook.py``
converts textbook -> PyTorch and compares outputs; here both directions, through real modules
(Python and C++ adapters), bitwise after a round trip, and with outputs, per-head probabilities
and every gradient (parameter gradients mapped through the same conversion) equal to PyTorch's.
"""

from typing import Dict, Optional, Tuple

import pytest
import torch
from conftest import assert_close, randomize_parameters
from torch import Tensor, nn

import torchmha
from torchmha.testing import pytorch_to_textbook, textbook_to_pytorch

HEADS, D_MODEL, BATCH, TARGET_LEN, SOURCE_LEN = 2, 8, 3, 4, 6
F64 = torch.float64


def make_textbook(impl: str) -> nn.Module:
    """The Python or the C++ textbook adapter in float64, eval mode (dropout off)."""
    if impl == "python":
        module: nn.Module = torchmha.TextbookMultiHeadAttention(HEADS, D_MODEL).to(F64)
    else:
        module = torchmha.cpp.TextbookMultiHeadAttention(HEADS, D_MODEL).to(F64)
    return module.eval()


def assert_states_equal(actual: Dict[str, Tensor], expected: Dict[str, Tensor]) -> None:
    """Same keys, bitwise equal tensors."""
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("impl", ["python", "cpp"])
def test_round_trips_are_bitwise(impl: str) -> None:
    """textbook -> PyTorch -> textbook and PyTorch -> textbook -> PyTorch, through strict loads
    into real modules, give back every parameter bit for bit."""
    textbook = make_textbook(impl)
    randomize_parameters(textbook)
    original = {name: t.clone() for name, t in textbook.state_dict().items()}
    pytorch = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True, dtype=F64)
    pytorch.load_state_dict(textbook_to_pytorch(original), strict=True)
    back = make_textbook(impl)
    back.load_state_dict(pytorch_to_textbook(pytorch.state_dict()), strict=True)
    assert_states_equal(back.state_dict(), original)

    source = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True, dtype=F64)
    randomize_parameters(source)
    original = {name: t.clone() for name, t in source.state_dict().items()}
    textbook = make_textbook(impl)
    textbook.load_state_dict(pytorch_to_textbook(original), strict=True)
    target = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True, dtype=F64)
    target.load_state_dict(textbook_to_pytorch(textbook.state_dict()), strict=True)
    assert_states_equal(target.state_dict(), original)


def masks(kind: str) -> Tuple[Optional[Tensor], Dict[str, Tensor]]:
    """The chapter's mask (nonzero = attend) and the equivalent PyTorch keyword masks."""
    if kind == "none":
        return None, {}
    if kind == "causal":
        chapter = torch.ones(BATCH, 1, TARGET_LEN, SOURCE_LEN, dtype=torch.int64).tril()
        blocked = (chapter == 0).expand(BATCH, HEADS, TARGET_LEN, SOURCE_LEN)
        return chapter, {"attn_mask": blocked.reshape(BATCH * HEADS, TARGET_LEN, SOURCE_LEN)}
    lengths = torch.tensor([SOURCE_LEN, 2, 4])
    valid = torch.arange(SOURCE_LEN) < lengths[:, None]
    return valid[:, None, None, :], {"key_padding_mask": ~valid}


@pytest.mark.parametrize("impl", ["python", "cpp"])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding"])
@pytest.mark.parametrize("direction", ["pytorch_to_textbook", "textbook_to_pytorch"])
def test_converted_modules_agree(direction: str, mask_kind: str, impl: str) -> None:
    """After conversion either way: output, per-head probabilities (``attn`` vs PyTorch's
    ``average_attn_weights=False`` weights), input gradients, and parameter gradients (converted
    like the parameters) are equal."""
    pytorch = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True, dtype=F64)
    textbook = make_textbook(impl)
    if direction == "pytorch_to_textbook":
        randomize_parameters(pytorch)
        textbook.load_state_dict(pytorch_to_textbook(pytorch.state_dict()), strict=True)
    else:
        randomize_parameters(textbook)
        pytorch.load_state_dict(textbook_to_pytorch(textbook.state_dict()), strict=True)
    inputs = [
        torch.randn(BATCH, length, D_MODEL, dtype=F64)
        for length in (TARGET_LEN, SOURCE_LEN, SOURCE_LEN)
    ]
    chapter_mask, pytorch_masks = masks(mask_kind)
    cotangent = torch.randn(BATCH, TARGET_LEN, D_MODEL, dtype=F64)
    attn_cotangent = torch.randn(BATCH, HEADS, TARGET_LEN, SOURCE_LEN, dtype=F64)

    pytorch_leaves = [t.clone().requires_grad_(True) for t in inputs]
    expected, expected_attn = pytorch(*pytorch_leaves, average_attn_weights=False, **pytorch_masks)
    ((expected * cotangent).sum() + (expected_attn * attn_cotangent).sum()).backward()
    textbook_leaves = [t.clone().requires_grad_(True) for t in inputs]
    actual = textbook(*textbook_leaves, mask=chapter_mask)
    actual_attn = textbook.attn
    ((actual * cotangent).sum() + (actual_attn * attn_cotangent).sum()).backward()

    assert_close(actual, expected)
    assert_close(actual_attn, expected_attn)
    for mine, theirs in zip(textbook_leaves, pytorch_leaves):
        assert_close(mine.grad, theirs.grad)
    textbook_grads = {name: p.grad for name, p in textbook.named_parameters()}
    pytorch_grads = {name: p.grad for name, p in pytorch.named_parameters()}
    assert pytorch_grads.keys() == {
        "in_proj_weight",
        "in_proj_bias",
        "out_proj.weight",
        "out_proj.bias",
    }
    for name, grad in textbook_to_pytorch(textbook_grads).items():
        assert_close(grad, pytorch_grads[name], msg=lambda m, n=name: f"{n}: {m}")
