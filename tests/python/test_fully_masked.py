"""A query whose keys are all masked: torchmha's documented difference from PyTorch, on every path.

torchmha's rule: such a query attends to nothing, i.e. zero attention output before the output
projection (the output row is exactly ``out_proj.bias``), zero weights, finite gradients. What
PyTorch does, and hence why the rule exists: on the softmax path (``need_weights=True``) its
output row and weights are NaN and the NaN reaches every gradient; on the SDPA path
(``need_weights=False``) its CPU kernel already returns the zero row, and there the two modules
are compared in full (outputs and gradients).

Masked rows are made via ``attn_mask``, via ``key_padding_mask``, and via both together (neither
alone masks the row), as bool and as float (``-inf``) masks; in float32, float64, bfloat16 and
float16; for ``torchmha.MultiHeadAttention`` and ``torchmha.cpp.MultiHeadAttention``. With
``add_zero_attn`` (or ``add_bias_kv``) the appended key is never masked, so the row is not fully
masked and both modules must equal PyTorch everywhere.
"""

import copy
from typing import Any, Dict, Optional, Tuple

import pytest
import torch
from conftest import (
    IMPLS,
    LOW_PRECISION_FLOOR,
    assert_close,
    assert_no_worse_than_pytorch,
    assert_parity,
    grads_by_name,
    make_impl_pair,
)
from torch import Tensor, nn

EMBED_DIM, NUM_HEADS, BATCH, TARGET_LEN, SOURCE_LEN = 8, 2, 2, 4, 5
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
ROUTES = ["attn_mask", "key_padding_mask", "both"]


def fully_masked_setup(route: str) -> Tuple[Dict[str, Tensor], Tensor]:
    """Bool masks (True = not allowed) and the ``(N, L)`` rows that see no key through them.

    ``attn_mask``: query 1 of every batch entry; ``key_padding_mask``: every query of batch 1;
    ``both``: padding hides keys 0-2 of batch 1 and a 3-D attention mask hides keys 3-4 from
    query 2 of batch 1 (every head), so only their union masks that row.
    """
    rows = torch.zeros(BATCH, TARGET_LEN, dtype=torch.bool)
    if route == "attn_mask":
        attn = torch.zeros(TARGET_LEN, SOURCE_LEN, dtype=torch.bool)
        attn[1] = True
        rows[:, 1] = True
        return {"attn_mask": attn}, rows
    if route == "key_padding_mask":
        padding = torch.zeros(BATCH, SOURCE_LEN, dtype=torch.bool)
        padding[1] = True
        rows[1] = True
        return {"key_padding_mask": padding}, rows
    padding = torch.zeros(BATCH, SOURCE_LEN, dtype=torch.bool)
    padding[1, :3] = True
    attn = torch.zeros(BATCH, NUM_HEADS, TARGET_LEN, SOURCE_LEN, dtype=torch.bool)
    attn[1, :, 2, 3:] = True
    rows[1, 2] = True
    return {"key_padding_mask": padding, "attn_mask": attn.flatten(0, 1)}, rows


def as_form(masks: Dict[str, Tensor], form: str, dtype: torch.dtype) -> Dict[str, Tensor]:
    """The masks as given (bool) or as float masks: random finite values, ``-inf`` where True."""
    if form == "bool":
        return masks
    return {
        name: (torch.randn(mask.shape) * 0.5).to(dtype).masked_fill(mask, float("-inf"))
        for name, mask in masks.items()
    }


def run(
    module: nn.Module,
    inputs: Tuple[Tensor, ...],
    cotangents: Tuple[Tensor, Tensor],
    **kwargs: Any,
) -> Tuple[Tensor, Optional[Tensor], Dict[str, Optional[Tensor]]]:
    """Forward and backward of random cotangents; returns output, weights and all gradients."""
    module.zero_grad(set_to_none=True)
    leaves = [tensor.detach().clone().requires_grad_(True) for tensor in inputs]
    output, weights = module(*leaves, **kwargs)
    loss = (output.double() * cotangents[0]).sum()
    if weights is not None:
        loss = loss + (weights.double() * cotangents[1]).sum()
    loss.backward()
    grads = {f"input{i}": t.grad for i, t in enumerate(leaves)}
    grads.update(grads_by_name(module))
    return output.detach(), None if weights is None else weights.detach(), grads


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("form", ["bool", "float"])
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_row_attends_to_nothing(
    dtype: torch.dtype, route: str, form: str, need_weights: bool, impl: str
) -> None:
    """Output row = out_proj.bias exactly, zero weights, finite gradients; every other row (and,
    where PyTorch is not NaN, every row) agrees with PyTorch."""
    reference, candidate = make_impl_pair(impl, EMBED_DIM, NUM_HEADS, dtype, batch_first=True)
    bool_masks, rows = fully_masked_setup(route)
    if route == "both":
        # Neither mask alone hides every key from the row: only their union does.
        assert not bool_masks["key_padding_mask"][1].all()
        assert not bool_masks["attn_mask"][NUM_HEADS:, 2].all(-1).any()
    masks = as_form(bool_masks, form, dtype)
    inputs = tuple(
        torch.randn(BATCH, length, EMBED_DIM, dtype=dtype)
        for length in (TARGET_LEN, SOURCE_LEN, SOURCE_LEN)
    )
    kwargs = dict(masks, need_weights=need_weights, average_attn_weights=False)
    weights_shape = (BATCH, NUM_HEADS, TARGET_LEN, SOURCE_LEN)
    cotangents = (
        torch.randn(BATCH, TARGET_LEN, EMBED_DIM, dtype=torch.float64),
        torch.randn(weights_shape, dtype=torch.float64),
    )
    output, weights, grads = run(candidate, inputs, cotangents, **kwargs)
    expected_output, expected_weights, expected_grads = run(reference, inputs, cotangents, **kwargs)

    # torchmha: zero attention before the projection, zero weights, nothing NaN.
    bias = candidate.state_dict()["out_proj.bias"]
    assert torch.equal(output[rows], bias.expand(int(rows.sum()), -1))
    assert torch.isfinite(output).all()
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all(), name
    if need_weights:
        assert weights is not None and weights.shape == weights_shape
        assert not weights.permute(0, 2, 1, 3)[rows].any()

    # PyTorch: NaN on the softmax path (the reason for the rule), the same zero row on SDPA.
    pytorch_nan_rows = expected_output.isnan().any(-1)
    assert torch.equal(pytorch_nan_rows, rows if need_weights else torch.zeros_like(rows))

    keep = ~rows
    if dtype in (torch.float32, torch.float64):
        assert_close(output[keep], expected_output[keep])
        if need_weights:
            assert_close(
                weights.permute(0, 2, 1, 3)[keep], expected_weights.permute(0, 2, 1, 3)[keep]
            )
        else:
            # No NaN on PyTorch's side: the whole result and every gradient must agree.
            assert_close(output, expected_output)
            for name, expected_grad in expected_grads.items():
                assert_close(grads[name], expected_grad, msg=lambda m, n=name: f"{n}: {m}")
        return
    # Low precision: the unmasked rows are no further from float64 than PyTorch's own.
    truth_module = copy.deepcopy(reference).double()
    truth_masks = {n: m if m.dtype == torch.bool else m.double() for n, m in masks.items()}
    with torch.no_grad():
        truth, _ = truth_module(*(t.double() for t in inputs), **dict(kwargs, **truth_masks))
    assert_no_worse_than_pytorch(
        output[keep], expected_output[keep], truth[keep], LOW_PRECISION_FLOOR[dtype], "output"
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("appended", ["add_zero_attn", "add_bias_kv"])
@pytest.mark.parametrize("route", ROUTES)
def test_appended_key_keeps_the_row_visible(
    route: str, appended: str, need_weights: bool, impl: str
) -> None:
    """With the zero key (or bias_k) appended, no row is fully masked: PyTorch is finite and
    both modules equal it in full (outputs, weights, all gradients)."""
    reference, candidate = make_impl_pair(
        impl, EMBED_DIM, NUM_HEADS, torch.float64, batch_first=True, **{appended: True}
    )
    masks, _ = fully_masked_setup(route)
    inputs = tuple(
        torch.randn(BATCH, length, EMBED_DIM, dtype=torch.float64)
        for length in (TARGET_LEN, SOURCE_LEN, SOURCE_LEN)
    )
    with torch.no_grad():
        expected, _ = reference(*inputs, need_weights=True, **masks)
    assert torch.isfinite(expected).all()  # The row is no longer fully masked for PyTorch.
    assert_parity(
        reference,
        candidate,
        inputs,
        need_weights=need_weights,
        average_attn_weights=False,
        **masks,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_one_fully_masked_head_is_zero_in_that_head_only(impl: str, dtype: torch.dtype) -> None:
    """A 3-D mask that hides every key from one query in one head only: that head's weights are
    zero, the other head's equal PyTorch's (PyTorch's masked head is NaN), and the output is the
    out_proj of the concatenated heads with that head's part zero."""
    reference, candidate = make_impl_pair(impl, EMBED_DIM, NUM_HEADS, dtype, batch_first=True)
    attn = torch.zeros(BATCH, NUM_HEADS, TARGET_LEN, SOURCE_LEN, dtype=torch.bool)
    attn[0, 1, 3] = True
    inputs = tuple(
        torch.randn(BATCH, length, EMBED_DIM, dtype=dtype)
        for length in (TARGET_LEN, SOURCE_LEN, SOURCE_LEN)
    )
    kwargs = {"attn_mask": attn.flatten(0, 1), "average_attn_weights": False}
    with torch.no_grad():
        output, weights = candidate(*inputs, **kwargs)
        expected_output, expected_weights = reference(*inputs, **kwargs)
    assert expected_weights[0, 1, 3].isnan().all() and expected_output[0, 3].isnan().all()
    assert torch.isfinite(output).all()
    assert not weights[0, 1, 3].any()
    others = torch.ones_like(weights, dtype=torch.bool)
    others[0, 1, 3] = False
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if dtype == torch.float16 else {}
    assert_close(weights.double()[others], expected_weights.double()[others], **tolerance)
    # Rebuild the output from the returned per-head weights: value projection, heads, out_proj.
    state = {name: tensor.double() for name, tensor in candidate.state_dict().items()}
    v = torch.nn.functional.linear(
        inputs[2].double(),
        state["in_proj_weight"][2 * EMBED_DIM :],
        state["in_proj_bias"][2 * EMBED_DIM :],
    )
    v = v.unflatten(-1, (NUM_HEADS, -1)).transpose(1, 2)  # (N, H, S, D)
    merged = (weights.double() @ v).transpose(1, 2).flatten(-2)
    rebuilt = torch.nn.functional.linear(merged, state["out_proj.weight"], state["out_proj.bias"])
    assert_close(output.double(), rebuilt, **tolerance)
