"""bfloat16 and float16 on the CPU: both torchmha modules against ``torch.nn.MultiheadAttention``.

The criterion is the one of ``test_cuda.py``: the truth is PyTorch's module in float64 with the
same (already rounded) weights and inputs; in each low-precision dtype torchmha's largest error to
the truth may be at most twice PyTorch's own module's error in that dtype, plus a small floor
(``conftest.LOW_PRECISION_FLOOR``). Bitwise or fixed-tolerance equality would be unfair: the two
may round in a different order, and either may be the closer one.
"""

import copy
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
from conftest import (
    IMPLS,
    LOW_PRECISION_FLOOR,
    assert_no_worse_than_pytorch,
    grads_by_name,
    make_impl_pair,
)
from torch import Tensor, nn

EMBED_DIM, NUM_HEADS, BATCH, TARGET_LEN, SOURCE_LEN = 16, 4, 2, 5, 7
LOW_DTYPES = [torch.bfloat16, torch.float16]
MASK_KINDS = ["none", "key_padding_bool", "attn_bool_causal", "attn_float_3d", "both"]


def make_masks(kind: str, dtype: torch.dtype) -> Dict[str, Tensor]:
    """Masks in the module's dtype (float ones), True/-inf = not allowed; key 0 always visible."""
    padding = torch.rand(BATCH, SOURCE_LEN) < 0.3
    padding[:, 0] = False
    causal = torch.ones(TARGET_LEN, SOURCE_LEN, dtype=torch.bool).triu(1)
    attn_3d = torch.rand(BATCH * NUM_HEADS, TARGET_LEN, SOURCE_LEN) < 0.3
    attn_3d[..., 0] = False
    float_3d = (torch.randn(attn_3d.shape) * 0.5).masked_fill(attn_3d, float("-inf")).to(dtype)
    return {
        "none": {},
        "key_padding_bool": {"key_padding_mask": padding},
        "attn_bool_causal": {"attn_mask": causal},
        "attn_float_3d": {"attn_mask": float_3d},
        "both": {"key_padding_mask": padding, "attn_mask": causal},
    }[kind]


def results(
    module: nn.Module, inputs: List[Tensor], cotangent: Tensor, **kwargs: Any
) -> Dict[str, Tensor]:
    """Output, weights, input and parameter gradients of ``module`` on inputs cast to its dtype."""
    dtype = next(iter(module.parameters())).dtype
    module.zero_grad(set_to_none=True)
    leaves = [tensor.detach().to(dtype).clone().requires_grad_(True) for tensor in inputs]
    output, weights = module(*leaves, **kwargs)
    (output.double() * cotangent).sum().backward()
    found = {"output": output, **{f"input{i}.grad": t.grad for i, t in enumerate(leaves)}}
    if weights is not None:
        found["weights"] = weights
    found.update({f"{name}.grad": grad for name, grad in grads_by_name(module).items()})
    return {name: tensor.detach().double() for name, tensor in found.items()}


def float64_masks(masks: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The same masks for the float64 truth (float masks upcast exactly)."""
    return {
        name: mask if mask.dtype == torch.bool else mask.double() for name, mask in masks.items()
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_mode", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_no_worse_than_pytorch_in_the_same_dtype(
    dtype: torch.dtype, mask_kind: str, weight_mode: Tuple[bool, bool], impl: str
) -> None:
    """Output, weights, input gradients and parameter gradients, cross-attention."""
    need_weights, average = weight_mode
    pytorch, candidate = make_impl_pair(impl, EMBED_DIM, NUM_HEADS, dtype)
    truth_module = copy.deepcopy(pytorch).double()  # Same rounded weights, exact arithmetic.
    inputs = [
        torch.randn(length, BATCH, EMBED_DIM, dtype=dtype).double()
        for length in (TARGET_LEN, SOURCE_LEN, SOURCE_LEN)
    ]
    masks = make_masks(mask_kind, dtype)
    kwargs = {"need_weights": need_weights, "average_attn_weights": average}
    cotangent = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=torch.float64)

    truth = results(truth_module, inputs, cotangent, **float64_masks(masks), **kwargs)
    theirs = results(pytorch, inputs, cotangent, **masks, **kwargs)
    ours = results(candidate, inputs, cotangent, **masks, **kwargs)
    assert ours.keys() == theirs.keys() == truth.keys()
    assert ("weights" in ours) == need_weights
    for name in truth:
        assert torch.isfinite(ours[name]).all(), name
        assert_no_worse_than_pytorch(
            ours[name], theirs[name], truth[name], LOW_PRECISION_FLOOR[dtype], name
        )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_kind", ["key_padding", "attn_mask"])
def test_float16_bool_masks_never_overflow(impl: str, mask_kind: str, need_weights: bool) -> None:
    """Scores of 1e3 to 1e4 (float16's max is 65504) with a bool mask: finite output
    and gradients, and masked keys get exactly zero weight. A finite fill like the chapter's
    -1e9 cannot even be stored in float16 (it becomes -inf), so masking must be exact -inf."""
    dtype = torch.float16
    _, candidate = make_impl_pair(impl, EMBED_DIM, NUM_HEADS, dtype)
    with torch.no_grad():
        for name, parameter in candidate.named_parameters():
            if name == "in_proj_weight":
                parameter.copy_(torch.eye(EMBED_DIM, dtype=dtype).repeat(3, 1))  # q = k = v = x
            elif "bias" in name:
                parameter.zero_()
    x = (torch.randn(TARGET_LEN, BATCH, EMBED_DIM) * 30).to(dtype).requires_grad_(True)
    masked_key = 2
    if mask_kind == "key_padding":
        padding = torch.zeros(BATCH, TARGET_LEN, dtype=torch.bool)
        padding[:, masked_key] = True
        masks: Dict[str, Optional[Tensor]] = {"key_padding_mask": padding}
    else:
        attn = torch.zeros(TARGET_LEN, TARGET_LEN, dtype=torch.bool)
        attn[:, masked_key] = True
        masks = {"attn_mask": attn}
    # q.k / sqrt(head_dim) = sum of 4 products of entries ~30 (up to ~90), halved: 1e3 to 2e4.
    output, weights = candidate(
        x, x, x, need_weights=need_weights, average_attn_weights=False, **masks
    )
    output.float().square().mean().backward()
    assert torch.isfinite(output).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.tensor(-1e9).to(dtype).isinf()  # Why a finite fill would not do here.
    if need_weights:
        assert weights is not None
        assert torch.equal(weights[..., masked_key], torch.zeros_like(weights[..., masked_key]))
        assert torch.isfinite(weights).all()
        row_sums = weights.float().sum(-1)
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=1e-2, rtol=0)
