"""``gradcheck`` and ``gradgradcheck`` on the op in float64, beyond what ``test_op.py`` checks.

``test_op.py`` gradchecks packed weights with a bool mask and separate weights with bias_k/bias_v
and bool masks. Added here: second derivatives (``gradgradcheck``), ``add_zero_attn``, float
masks as differentiable inputs, unbatched inputs, ``is_causal`` without a mask, per-head and
averaged weights, and fully masked rows (whose gradients must be finite *and* correct).

Second derivatives with ``need_weights=False``: the op then calls SDPA, and on the CPU PyTorch
picks its flash kernel, whose backward has no derivative (``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``) - for PyTorch's
own ``multi_head_attention_forward`` just as for torchmha. The tests assert that torchmha fails
exactly when PyTorch does (with the same error) and that with SDPA's math backend, which PyTorch
lets a caller choose, second derivatives work and are correct.
"""

from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchmha

EMBED_DIM, NUM_HEADS, BATCH, TARGET_LEN, SOURCE_LEN, KDIM, VDIM = 4, 2, 2, 2, 3, 3, 5
F64 = torch.float64


def parameter(*shape: int) -> Tensor:
    """A random float64 tensor that requires grad (scaled to keep the softmax unsaturated)."""
    return (torch.randn(shape, dtype=F64) * 0.5).requires_grad_(True)


def separate_case(
    need_weights: bool,
) -> Tuple[Callable[..., Tuple[Tensor, ...]], Tuple[Tensor, ...]]:
    """Separate q/k/v weights (kdim, vdim != embed_dim), bias_k/bias_v, add_zero_attn, batch-first,
    per-head weights, and float ``attn_mask`` (3-D) and ``key_padding_mask`` as inputs."""
    inputs = {
        "query": parameter(BATCH, TARGET_LEN, EMBED_DIM),
        "key": parameter(BATCH, SOURCE_LEN, KDIM),
        "value": parameter(BATCH, SOURCE_LEN, VDIM),
        "q_proj_weight": parameter(EMBED_DIM, EMBED_DIM),
        "k_proj_weight": parameter(EMBED_DIM, KDIM),
        "v_proj_weight": parameter(EMBED_DIM, VDIM),
        "in_proj_bias": parameter(3 * EMBED_DIM),
        "out_proj_weight": parameter(EMBED_DIM, EMBED_DIM),
        "out_proj_bias": parameter(EMBED_DIM),
        "bias_k": parameter(1, 1, EMBED_DIM),
        "bias_v": parameter(1, 1, EMBED_DIM),
        "attn_mask": parameter(BATCH * NUM_HEADS, TARGET_LEN, SOURCE_LEN),
        "key_padding_mask": parameter(BATCH, SOURCE_LEN),
    }

    def attention(*tensors: Tensor) -> Tuple[Tensor, ...]:
        named = dict(zip(inputs.keys(), tensors))
        output, weights = torchmha.multi_head_attention(
            named["query"],
            named["key"],
            named["value"],
            NUM_HEADS,
            None,
            named["in_proj_bias"],
            out_proj_weight=named["out_proj_weight"],
            out_proj_bias=named["out_proj_bias"],
            q_proj_weight=named["q_proj_weight"],
            k_proj_weight=named["k_proj_weight"],
            v_proj_weight=named["v_proj_weight"],
            bias_k=named["bias_k"],
            bias_v=named["bias_v"],
            add_zero_attn=True,
            key_padding_mask=named["key_padding_mask"],
            attn_mask=named["attn_mask"],
            need_weights=need_weights,
            average_attn_weights=False,
            batch_first=True,
        )
        return (output,) if weights is None else (output, weights)

    return attention, tuple(inputs.values())


def packed_case(
    need_weights: bool,
    unbatched: bool = False,
    is_causal: bool = False,
    fully_masked: bool = False,
    pytorch: bool = False,
) -> Tuple[Callable[..., Tuple[Tensor, ...]], Tuple[Tensor, ...]]:
    """Self-attention with packed weights and averaged weights; bool masks (attn 2-D and key
    padding) unless ``is_causal`` (no mask at all); ``fully_masked`` hides every key from query 1.
    ``pytorch`` computes the same with PyTorch's ``F.multi_head_attention_forward`` instead."""
    length = 3
    shape = (length, EMBED_DIM) if unbatched else (length, BATCH, EMBED_DIM)
    tensors = (
        parameter(*shape),
        parameter(3 * EMBED_DIM, EMBED_DIM),
        parameter(3 * EMBED_DIM),
        parameter(EMBED_DIM, EMBED_DIM),
        parameter(EMBED_DIM),
    )
    masks: Dict[str, Optional[Tensor]] = {}
    if not is_causal:
        attn_mask = torch.tensor([[False, True, False], [False, False, True], [True, False, False]])
        if fully_masked:
            attn_mask[1] = True
        padding = torch.tensor(
            [False, False, True] if unbatched else [[False] * 3, [True, False, False]]
        )
        masks = {"attn_mask": attn_mask, "key_padding_mask": padding}

    def attention(
        x: Tensor, w_in: Tensor, b_in: Tensor, w_out: Tensor, b_out: Tensor
    ) -> Tuple[Tensor, ...]:
        if pytorch:
            output, weights = F.multi_head_attention_forward(
                x,
                x,
                x,
                EMBED_DIM,
                NUM_HEADS,
                w_in,
                b_in,
                None,
                None,
                False,
                0.0,
                w_out,
                b_out,
                training=False,
                need_weights=need_weights,
                is_causal=is_causal,
                **masks,
            )
            return (output,) if weights is None else (output, weights)
        output, weights = torchmha.multi_head_attention(
            x,
            x,
            x,
            NUM_HEADS,
            w_in,
            b_in,
            out_proj_weight=w_out,
            out_proj_bias=b_out,
            need_weights=need_weights,
            is_causal=is_causal,
            **masks,
        )
        return (output,) if weights is None else (output, weights)

    return attention, tensors


@pytest.mark.parametrize("need_weights", [True, False])
def test_gradcheck_separate_weights_zero_attn_and_float_masks(need_weights: bool) -> None:
    """First derivatives, including those w.r.t. the float masks, equal finite differences."""
    attention, inputs = separate_case(need_weights)
    assert torch.autograd.gradcheck(attention, inputs)


def test_gradgradcheck_separate_weights_zero_attn_and_float_masks() -> None:
    """Second derivatives on the softmax path (need_weights=True)."""
    attention, inputs = separate_case(need_weights=True)
    assert torch.autograd.gradgradcheck(attention, inputs)


def test_gradgradcheck_without_weights_on_sdpa_math_backend() -> None:
    """Second derivatives on the SDPA path, with the math backend (double-differentiable)."""
    attention, inputs = separate_case(need_weights=False)
    with sdpa_kernel([SDPBackend.MATH]):
        assert torch.autograd.gradgradcheck(attention, inputs)


def outcome(check: Callable[[], bool]) -> Tuple[bool, str]:
    """(passed, error message) of a gradgradcheck."""
    try:
        return check(), ""
    except RuntimeError as error:
        return False, str(error).splitlines()[0]


def test_gradgradcheck_without_weights_fails_only_where_pytorch_does() -> None:
    """Default SDPA backend: torchmha's second derivative works exactly when PyTorch's MHA does,
    and fails with PyTorch's own error (the CPU flash kernel's backward) when it does not."""
    attention, inputs = packed_case(need_weights=False)
    reference, _ = packed_case(need_weights=False, pytorch=True)
    ours = outcome(lambda: torch.autograd.gradgradcheck(attention, inputs))
    theirs = outcome(lambda: torch.autograd.gradgradcheck(reference, inputs))
    assert ours == theirs


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize(
    "variant", ["bool_masks", "unbatched", "is_causal_no_mask", "unbatched_causal", "fully_masked"]
)
def test_gradcheck_and_gradgradcheck_packed(variant: str, need_weights: bool) -> None:
    """Packed self-attention: bool masks, unbatched, causal without a mask, and a fully masked
    query row (torchmha's zero row: its gradients are finite and equal finite differences)."""
    attention, inputs = packed_case(
        need_weights,
        unbatched="unbatched" in variant,
        is_causal="causal" in variant,
        fully_masked=variant == "fully_masked",
    )
    assert torch.autograd.gradcheck(attention, inputs)
    if need_weights:
        assert torch.autograd.gradgradcheck(attention, inputs)
    else:
        with sdpa_kernel([SDPBackend.MATH]):
            assert torch.autograd.gradgradcheck(attention, inputs)
