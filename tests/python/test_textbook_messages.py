"""The Python textbook adapter refuses what the C++ one refuses, with the same message."""

import re
from typing import Tuple

import pytest
import torch
from torch import Tensor

import torchmha

H, D_MODEL, BATCH, TARGET_LEN, SOURCE_LEN = 2, 8, 3, 4, 6

# The module's name starts each message; the rest is the same in both languages.
PREFIX = re.compile(r"^torchmha(::|\.)TextbookMultiHeadAttention: ")


def message_without_prefix(module: torch.nn.Module, *args: Tensor, **kwargs: Tensor) -> str:
    # A shape is a RuntimeError in both languages (the C++ adapter's c10::Error).
    with pytest.raises(RuntimeError) as error:
        module(*args, **kwargs)
    message = str(error.value).splitlines()[0]
    assert PREFIX.match(message), message
    return PREFIX.sub("", message)


def both_modules() -> Tuple[torch.nn.Module, torch.nn.Module]:
    return (
        torchmha.TextbookMultiHeadAttention(H, D_MODEL),
        torchmha.cpp.TextbookMultiHeadAttention(H, D_MODEL),
    )


def test_mask_of_rank_five_is_refused_by_name_as_in_cpp() -> None:
    """A mask with more dimensions than ``(B, h, L, S)`` names `mask`, the target and the shape."""
    query = torch.randn(BATCH, TARGET_LEN, D_MODEL)
    memory = torch.randn(BATCH, SOURCE_LEN, D_MODEL)
    mask = torch.ones(BATCH, 1, 1, TARGET_LEN, SOURCE_LEN)
    python, cpp = (
        message_without_prefix(m, query, memory, memory, mask=mask) for m in both_modules()
    )
    assert python == cpp
    assert "`mask`" in python
    assert f"(B, h, L, S) = ({BATCH}, {H}, {TARGET_LEN}, {SOURCE_LEN})" in python
    assert f"[{BATCH}, 1, 1, {TARGET_LEN}, {SOURCE_LEN}]" in python


def test_inputs_of_wrong_rank_are_refused_by_name_as_in_cpp() -> None:
    """A 2-D query names `query`, `key` and `value` with their shapes."""
    query = torch.randn(TARGET_LEN, D_MODEL)
    memory = torch.randn(BATCH, SOURCE_LEN, D_MODEL)
    python, cpp = (message_without_prefix(m, query, memory, memory) for m in both_modules())
    assert python == cpp
    assert f"[{TARGET_LEN}, {D_MODEL}], [{BATCH}, {SOURCE_LEN}, {D_MODEL}]" in python


@pytest.mark.parametrize(
    "shape",
    [
        (BATCH, 1, TARGET_LEN, SOURCE_LEN + 1),
        (BATCH, H, TARGET_LEN - 1, SOURCE_LEN),
        (BATCH + 1, 1, 1, SOURCE_LEN),
        (H + 1, TARGET_LEN, SOURCE_LEN),
    ],
    ids=["source_len", "target_len", "batch", "heads"],
)
def test_mask_that_does_not_broadcast_is_refused_by_name_as_in_cpp(shape: Tuple[int, ...]) -> None:
    """A mask of rank 4 or less whose sizes do not broadcast to ``(B, h, L, S)`` names `mask`,
    the target and the shape (it used to surface as ``expand``'s message)."""
    query = torch.randn(BATCH, TARGET_LEN, D_MODEL)
    memory = torch.randn(BATCH, SOURCE_LEN, D_MODEL)
    mask = torch.ones(*shape)
    python, cpp = (
        message_without_prefix(m, query, memory, memory, mask=mask) for m in both_modules()
    )
    assert python == cpp
    assert "`mask`" in python
    assert f"(B, h, L, S) = ({BATCH}, {H}, {TARGET_LEN}, {SOURCE_LEN})" in python
    assert str(list(shape)) in python
