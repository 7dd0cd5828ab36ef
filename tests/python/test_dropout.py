"""Dropout of both torchmha modules against ``torch.nn.MultiheadAttention`` and its definition.

Dropout acts on the attention probabilities only, in training mode only: the eval-mode module is
the identity in that respect, the returned per-head weights are the dropped and rescaled
probabilities, the output projection is not dropped, and the draws come from the global
generator, so ``torch.manual_seed`` reproduces them. PyTorch's module draws one Bernoulli mask over
the same ``(batch * heads, L, S)`` probabilities in the same order (softmax path) or calls the same
SDPA kernel (no-weights path), so under one seed the two agree exactly; the tests below assert that
on every path they were run on (self/cross, masks, bias_kv with zero attention, unbatched).
"""

import math
from typing import Any, Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    DEVICES,
    IMPLS,
    assert_close,
    forward_backward,
    make_impl_pair,
    random_bool_masks,
    sequence_first,
)
from torch import Tensor, nn

EMBED_DIM, NUM_HEADS, BATCH = 8, 2, 3
F64 = torch.float64


def cross_inputs(
    batch: int = BATCH, target_len: int = 4, source_len: int = 6
) -> Tuple[Tensor, ...]:
    """Sequence-first float64 (query, key, value) with a longer source than target."""
    return tuple(
        sequence_first(batch, length, EMBED_DIM, False, F64)
        for length in (target_len, source_len, source_len)
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_mode", [(True, True), (True, False), (False, True)])
def test_eval_mode_is_identity(impl: str, weight_mode: Tuple[bool, bool]) -> None:
    """With dropout 0.5 in eval mode, outputs, weights and gradients equal PyTorch's module
    without dropout, and two calls give bitwise identical results."""
    need_weights, average = weight_mode
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, dtype=F64)  # dropout 0: the truth
    _, candidate = make_impl_pair(impl, EMBED_DIM, NUM_HEADS, F64, dropout=0.5)
    reference.load_state_dict(candidate.state_dict())
    candidate.eval()
    inputs = cross_inputs()
    kwargs = {"need_weights": need_weights, "average_attn_weights": average}
    with torch.no_grad():
        expected_output, expected_weights = reference(*inputs, **kwargs)
    cotangents = (
        torch.randn_like(expected_output),
        None if expected_weights is None else torch.randn_like(expected_weights),
    )
    expected = forward_backward(reference, inputs, cotangents, **kwargs)
    first = forward_backward(candidate, inputs, cotangents, **kwargs)
    second = forward_backward(candidate, inputs, cotangents, **kwargs)
    assert_close(first[0], expected[0])
    assert torch.equal(first[0], second[0])
    if need_weights:
        assert_close(first[1], expected[1])
    for mine, theirs in zip(first[2], expected[2]):
        assert_close(mine, theirs)
    for name, theirs in expected[3].items():
        assert_close(first[3][name], theirs)


def eval_probabilities(candidate: nn.Module, inputs: Tuple[Tensor, ...]) -> Tensor:
    """PyTorch's per-head attention probabilities (no dropout) for the candidate's weights."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, dtype=F64).eval()
    reference.load_state_dict(candidate.state_dict())
    with torch.no_grad():
        _, probabilities = reference(*inputs, average_attn_weights=False)
    return probabilities


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_training_drops_probabilities_at_rate_p_and_rescales(
    impl: str, p: float, device: str
) -> None:
    """The per-head weights returned in training are the eval probabilities, each either zero
    (with probability p) or scaled by 1/(1-p).

    With n Bernoulli(p) draws the number of zeros has mean n*p and standard deviation
    sqrt(n*p*(1-p)); the test allows 5 standard deviations (two-sided false-alarm probability
    about 6e-7 for a correct implementation; the seed is fixed anyway). n = 4*4*16*16 = 4096,
    so at p = 0.5 the zero fraction must lie in 0.5 +- 0.039.
    """
    with torch.device(device):
        check_drop_rate(impl, p)


def check_drop_rate(impl: str, p: float) -> None:
    """The body of the test above, on the default device."""
    embed_dim, heads = 16, 4
    reference, candidate = make_impl_pair(impl, embed_dim, heads, F64, dropout=p)
    inputs = (torch.randn(16, 4, embed_dim, dtype=F64),) * 3
    reference.eval()
    with torch.no_grad():
        _, probabilities = reference(*inputs, average_attn_weights=False)
        _, dropped = candidate(*inputs, average_attn_weights=False)
    assert candidate.training
    assert dropped.shape == probabilities.shape == (4, heads, 16, 16)
    assert (probabilities > 0).all()  # No mask: every zero below is a dropped probability.
    n = dropped.numel()
    zeros = int((dropped == 0).sum())
    bound = 5 * math.sqrt(n * p * (1 - p))
    assert abs(zeros - n * p) <= bound, f"{zeros} zeros of {n}, expected {n * p:.0f} +- {bound:.0f}"
    kept = dropped != 0
    assert_close(dropped[kept], probabilities[kept] / (1 - p))


def explicit_output_from_weights(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, weights: Tensor
) -> Tensor:
    """The output the module must give for per-head ``weights`` ``(N, H, L, S)``: value
    projection, ``weights @ v`` per head, concatenation, output projection (never dropped)."""
    state = module.state_dict()
    w_v = state["in_proj_weight"][2 * EMBED_DIM :]
    b_v = state["in_proj_bias"][2 * EMBED_DIM :]
    source_len, batch, _ = value.shape
    v = F.linear(value, w_v, b_v).reshape(source_len, batch, NUM_HEADS, -1).permute(1, 2, 0, 3)
    attended = weights @ v  # (N, H, L, D)
    merged = attended.permute(2, 0, 1, 3).reshape(query.size(0), batch, EMBED_DIM)
    return F.linear(merged, state["out_proj.weight"], state["out_proj.bias"])


@pytest.mark.parametrize("impl", IMPLS)
def test_output_is_the_dropped_weights_times_values(impl: str) -> None:
    """Dropout touches the probabilities only: the training output is exactly what the
    returned (dropped) weights give through the value and output projections."""
    _, candidate = make_impl_pair(impl, EMBED_DIM, NUM_HEADS, F64, dropout=0.5)
    query, key, value = cross_inputs()
    with torch.no_grad():
        output, weights = candidate(query, key, value, average_attn_weights=False)
    assert (weights == 0).any()  # Guards against a vacuous pass: something was dropped.
    assert_close(output, explicit_output_from_weights(candidate, query, key, value, weights))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_one_drops_every_probability_as_pytorch_does(impl: str, need_weights: bool) -> None:
    """p = 1 in training: PyTorch's output is exactly ``out_proj.bias`` (all probabilities
    dropped, projection kept) and its weights are zero; torchmha's are the same."""
    reference, candidate = make_impl_pair(impl, EMBED_DIM, NUM_HEADS, F64, dropout=1.0)
    inputs = cross_inputs()
    kwargs = {"need_weights": need_weights, "average_attn_weights": False}
    with torch.no_grad():
        expected_output, expected_weights = reference(*inputs, **kwargs)
        output, weights = candidate(*inputs, **kwargs)
    bias = candidate.state_dict()["out_proj.bias"].expand_as(output)
    assert torch.equal(expected_output, bias)  # What PyTorch does with p = 1.
    assert torch.equal(output, bias)
    if need_weights:
        assert expected_weights is not None and weights is not None
        assert not expected_weights.any() and not weights.any()
        assert weights.shape == expected_weights.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_same_seed_is_bitwise_reproducible_and_another_seed_differs(
    impl: str, need_weights: bool, device: str
) -> None:
    """``torch.manual_seed`` fixes the dropout draws; a different seed changes them."""
    results = []
    with torch.device(device):
        _, candidate = make_impl_pair(impl, EMBED_DIM, NUM_HEADS, F64, dropout=0.5)
        inputs = cross_inputs()
        for seed in (7, 7, 8):
            torch.manual_seed(seed)
            with torch.no_grad():
                results.append(
                    candidate(*inputs, need_weights=need_weights, average_attn_weights=False)
                )
    (first, first_weights), (again, again_weights), (other, other_weights) = results
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    if need_weights:
        assert torch.equal(first_weights, again_weights)
        assert not torch.equal(first_weights, other_weights)


VARIANTS: Dict[str, Dict[str, Any]] = {
    "self": {},
    "cross_padding": {"kind": "cross", "masks": "key_padding"},
    "cross_attn_3d": {"kind": "cross", "masks": "attn_3d"},
    "bias_kv_zero_attn": {"kind": "cross", "module": {"add_bias_kv": True, "add_zero_attn": True}},
    "batch_first": {"kind": "cross", "module": {"batch_first": True}},
    "unbatched": {"kind": "unbatched"},
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_mode", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_training_matches_pytorch_under_the_same_seed(
    variant: Dict[str, Any], weight_mode: Tuple[bool, bool], impl: str
) -> None:
    """Training mode, dropout 0.5, same seed before each call: outputs, weights and all
    gradients equal PyTorch's (the two draw the same Bernoulli mask from the same stream)."""
    need_weights, average = weight_mode
    module_options = variant.get("module", {})
    reference, candidate = make_impl_pair(
        impl, EMBED_DIM, NUM_HEADS, F64, dropout=0.5, **module_options
    )
    batch_first = module_options.get("batch_first", False)
    kind = variant.get("kind", "self")
    if kind == "unbatched":
        inputs: Tuple[Tensor, ...] = (torch.randn(5, EMBED_DIM, dtype=F64),) * 3
    elif kind == "self":
        inputs = (sequence_first(BATCH, 5, EMBED_DIM, batch_first, F64),) * 3
    else:
        inputs = tuple(
            sequence_first(BATCH, length, EMBED_DIM, batch_first, F64) for length in (4, 6, 6)
        )
    key_padding, _, attn_3d = random_bool_masks(BATCH, 4, 6, BATCH * NUM_HEADS)
    masks = {
        None: {},
        "key_padding": {"key_padding_mask": key_padding},
        "attn_3d": {"attn_mask": attn_3d},
    }[variant.get("masks")]
    kwargs = dict(masks, need_weights=need_weights, average_attn_weights=average)

    torch.manual_seed(11)
    with torch.no_grad():
        expected_output, expected_weights = reference(*inputs, **kwargs)
    cotangents = (
        torch.randn_like(expected_output),
        None if expected_weights is None else torch.randn_like(expected_weights),
    )
    torch.manual_seed(5)
    expected = forward_backward(reference, inputs, cotangents, **kwargs)
    torch.manual_seed(5)
    actual = forward_backward(candidate, inputs, cotangents, **kwargs)
    candidate.eval()
    without_dropout = candidate(*inputs, **kwargs)[0]

    # Guards against a vacuous pass: dropout really changed the result.
    assert not torch.allclose(actual[0], without_dropout)
    assert_close(actual[0], expected[0])
    if need_weights:
        assert_close(actual[1], expected[1])
    for mine, theirs in zip(actual[2], expected[2]):
        assert_close(mine, theirs)
    assert actual[3].keys() == expected[3].keys()
    for name, theirs in expected[3].items():
        assert_close(actual[3][name], theirs, msg=lambda m, n=name: f"{n}: {m}")
