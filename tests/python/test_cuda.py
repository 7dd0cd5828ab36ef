"""CUDA: torchmha against torch.nn.MultiheadAttention in float32, bfloat16 and float16.

Skipped (and reported as skipped) without a GPU; ``scripts/gpu_check.sh`` runs it on one. The
reference is PyTorch's module in float64 on the same device, so each dtype is held to a
tolerance that reflects its own precision rather than to another low-precision path.
"""

from typing import Dict, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchmha

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
EMBED_DIM, NUM_HEADS, BATCH, LENGTH = 64, 4, 3, 17
# Outputs are of order one; bfloat16 keeps 8 mantissa bits, float16 11.
TOLERANCES: Dict[torch.dtype, Dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 4e-2, "rtol": 4e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}
DTYPES = list(TOLERANCES)


def make_pair(dtype: torch.dtype) -> tuple:
    """A float64 PyTorch reference and a torchmha module in ``dtype`` with the same weights."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, batch_first=True)
    reference = reference.to(DEVICE, torch.float64)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    candidate = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, batch_first=True)
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate.to(DEVICE, dtype)


def masks(kind: str) -> Dict[str, Optional[Tensor]]:
    """Keyword masks for ``forward``; True = not allowed, one key always visible."""
    if kind == "none":
        return {}
    if kind == "padding":
        padding = torch.zeros(BATCH, LENGTH, dtype=torch.bool, device=DEVICE)
        padding[1, LENGTH // 2 :] = True
        return {"key_padding_mask": padding}
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool, device=DEVICE).triu(1)
    return {"attn_mask": causal}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal"])
def test_forward_and_backward_match_pytorch(
    dtype: torch.dtype, need_weights: bool, mask_kind: str
) -> None:
    """Output, weights and input gradient against PyTorch's float64 result."""
    torch.manual_seed(0)
    reference, candidate = make_pair(dtype)
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, device=DEVICE, dtype=torch.float64)
    cotangent = torch.randn_like(x)
    mask_kwargs = masks(mask_kind)

    x_reference = x.clone().requires_grad_()
    expected, expected_weights = reference(
        x_reference, x_reference, x_reference, need_weights=need_weights, **mask_kwargs
    )
    (expected_grad,) = torch.autograd.grad((expected * cotangent).sum(), x_reference)

    x_candidate = x.to(dtype).requires_grad_()
    output, weights = candidate(
        x_candidate, x_candidate, x_candidate, need_weights=need_weights, **mask_kwargs
    )
    (grad,) = torch.autograd.grad((output.double() * cotangent).sum(), x_candidate)

    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(output.double(), expected, **tolerance)
    torch.testing.assert_close(grad.double(), expected_grad, **tolerance)
    if need_weights:
        torch.testing.assert_close(weights.double(), expected_weights, **tolerance)
    else:
        assert weights is None


BACKENDS = [SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda backend: backend.name)
def test_fully_masked_query_is_zero_on_every_backend(dtype: torch.dtype, backend) -> None:
    """A query with every key masked gets out_proj.bias as output and finite gradients."""
    torch.manual_seed(0)
    _, candidate = make_pair(dtype)
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, device=DEVICE, dtype=dtype, requires_grad=True)
    attn_mask = torch.zeros(LENGTH, LENGTH, dtype=torch.bool, device=DEVICE)
    attn_mask[3] = True
    try:
        with sdpa_kernel([backend]):
            output, _ = candidate(x, x, x, attn_mask=attn_mask, need_weights=False)
            (grad,) = torch.autograd.grad(output.float().sum(), x)
    except RuntimeError as error:
        if "No available kernel" in str(error):
            pytest.skip(f"{backend.name} does not take this input here: {error}")
        raise
    assert torch.isfinite(output).all()
    assert torch.isfinite(grad).all()
    expected_row = candidate.out_proj.bias.expand(BATCH, EMBED_DIM)
    torch.testing.assert_close(output[:, 3], expected_row, **TOLERANCES[dtype])


def test_flash_backend_is_used_for_unmasked_bfloat16() -> None:
    """Without a mask, bfloat16 self-attention runs on the flash backend alone."""
    torch.manual_seed(0)
    reference, candidate = make_pair(torch.bfloat16)
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, device=DEVICE, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        output, _ = candidate(x, x, x, need_weights=False)
    expected, _ = reference(x.double(), x.double(), x.double(), need_weights=False)
    torch.testing.assert_close(output.double(), expected, **TOLERANCES[torch.bfloat16])
