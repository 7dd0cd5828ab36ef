"""``torchmha.MultiHeadAttention`` against ``torch.nn.MultiheadAttention`` with shared weights."""

from typing import Any, Dict, Tuple

import pytest
import torch
from conftest import (
    assert_close,
    assert_parity,
    leaf,
    make_mha_pair,
    random_bool_masks,
    randomize_parameters,
    sequence_first,
)
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

import torchmha

EMBED_DIM, NUM_HEADS, BATCH = 8, 2, 3

# Constructor variants whose parameters differ in name or shape.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True},
    "kdim_vdim": {"kdim": 5, "vdim": 6},
    "kdim_vdim_bias_kv_no_bias": {"kdim": 5, "vdim": 6, "add_bias_kv": True, "bias": False},
}

# need_weights, average_attn_weights.
WEIGHT_MODES = {"no_weights": (False, True), "averaged": (True, True), "per_head": (True, False)}


def shapes(module: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """State-dict key -> tensor shape."""
    return {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}


def attention_inputs(
    kind: str, batch_first: bool, dtype: torch.dtype, kdim: int = EMBED_DIM, vdim: int = EMBED_DIM
) -> Tuple[Tensor, Tensor, Tensor]:
    """(query, key, value): ``self`` is one tensor thrice; ``cross`` has a longer source."""
    query = sequence_first(BATCH, 4, EMBED_DIM, batch_first, dtype)
    if kind == "self":
        return query, query, query
    key = sequence_first(BATCH, 6, kdim, batch_first, dtype)
    if kind == "key_is_value":
        return query, key, key
    return query, key, sequence_first(BATCH, 6, vdim, batch_first, dtype)


def as_float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """An additive mask: random finite values, ``-inf`` where ``mask`` is True."""
    return (torch.randn(mask.shape, dtype=dtype) * 0.5).masked_fill(mask, float("-inf"))


MASK_KINDS = [
    "key_padding_bool",
    "key_padding_float",
    "attn_bool_2d",
    "attn_bool_3d",
    "attn_float_2d",
    "attn_float_3d",
    "both_bool",
    "both_float",
]


def masks_for(
    kind: str, batch: int, target_len: int, source_len: int, dtype: torch.dtype
) -> Dict[str, Tensor]:
    """The ``key_padding_mask``/``attn_mask`` keyword arguments for a ``MASK_KINDS`` entry."""
    key_padding, attn_2d, attn_3d = random_bool_masks(
        batch, target_len, source_len, batch * NUM_HEADS
    )
    as_type = (lambda mask: as_float_mask(mask, dtype)) if "float" in kind else (lambda m: m)
    if kind.startswith("key_padding"):
        return {"key_padding_mask": as_type(key_padding)}
    if kind.startswith("attn"):
        return {"attn_mask": as_type(attn_2d if kind.endswith("2d") else attn_3d)}
    return {"key_padding_mask": as_type(key_padding), "attn_mask": as_type(attn_3d)}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_state_dict_keys_and_shapes_equal_pytorch(config: Dict[str, Any]) -> None:
    """Every constructor variant names and shapes its parameters exactly as PyTorch does."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, **config)
    candidate = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **config)
    assert shapes(candidate) == shapes(reference)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_state_dict_loads_both_ways(config: Dict[str, Any]) -> None:
    """A state dict moves strictly from PyTorch to torchmha and back, values unchanged."""
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, **config)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(candidate.state_dict()[name], tensor), name

    source = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **config)
    randomize_parameters(source)
    target = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, **config)
    target.load_state_dict(source.state_dict(), strict=True)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name


@pytest.mark.parametrize("weight_mode", WEIGHT_MODES.values(), ids=WEIGHT_MODES.keys())
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", ["self", "cross", "key_is_value"])
def test_forward_and_gradients_match(
    kind: str, batch_first: bool, weight_mode: Tuple[bool, bool], dtype: torch.dtype
) -> None:
    """Self-, cross- and key-is-value attention, both layouts, every weight mode."""
    need_weights, average_attn_weights = weight_mode
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, dtype, batch_first=batch_first)
    assert_parity(
        reference,
        candidate,
        attention_inputs(kind, batch_first, dtype),
        need_weights=need_weights,
        average_attn_weights=average_attn_weights,
    )


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_masks_match(
    mask_kind: str, kind: str, batch_first: bool, need_weights: bool, dtype: torch.dtype
) -> None:
    """Bool and float key padding and attention masks (2-D and 3-D), alone and together."""
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, dtype, batch_first=batch_first)
    inputs = attention_inputs(kind, batch_first, dtype)
    target_len = 4
    source_len = 4 if kind == "self" else 6
    masks = masks_for(mask_kind, BATCH, target_len, source_len, dtype)
    assert_parity(reference, candidate, inputs, need_weights=need_weights, **masks)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_constructor_variants_match(config: Dict[str, Any], need_weights: bool) -> None:
    """No bias, bias_kv, zero attention and kdim/vdim, with a key padding mask."""
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, torch.float64, **config)
    inputs = attention_inputs(
        "cross",
        False,
        torch.float64,
        kdim=config.get("kdim", EMBED_DIM),
        vdim=config.get("vdim", EMBED_DIM),
    )
    key_padding_mask, _, _ = random_bool_masks(BATCH, 4, 6, BATCH * NUM_HEADS)
    assert_parity(
        reference,
        candidate,
        inputs,
        need_weights=need_weights,
        key_padding_mask=key_padding_mask,
    )


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "key_padding", "attn_2d", "attn_3d"])
@pytest.mark.parametrize("kind", ["self", "cross"])
def test_unbatched_inputs_match(
    kind: str, mask_kind: str, need_weights: bool, dtype: torch.dtype
) -> None:
    """2-D ``(L, E)`` inputs, with ``(S,)``, ``(L, S)`` and ``(num_heads, L, S)`` masks."""
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, dtype)
    query = torch.randn(4, EMBED_DIM, dtype=dtype)
    source_len = 4 if kind == "self" else 6
    key = query if kind == "self" else torch.randn(source_len, EMBED_DIM, dtype=dtype)
    value = query if kind == "self" else torch.randn(source_len, EMBED_DIM, dtype=dtype)
    key_padding, attn_2d, attn_3d = random_bool_masks(1, 4, source_len, NUM_HEADS)
    masks = {
        "none": {},
        "key_padding": {"key_padding_mask": key_padding[0]},
        "attn_2d": {"attn_mask": attn_2d},
        "attn_3d": {"attn_mask": attn_3d},
    }[mask_kind]
    assert_parity(reference, candidate, (query, key, value), need_weights=need_weights, **masks)


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_hint_with_mask_matches(need_weights: bool) -> None:
    """``is_causal=True`` together with the causal ``attn_mask``, as PyTorch expects it."""
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, torch.float64)
    inputs = attention_inputs("self", False, torch.float64)
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert_parity(
        reference, candidate, inputs, need_weights=need_weights, attn_mask=causal, is_causal=True
    )


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("use_mask", [False, True])
def test_eval_no_grad_matches_pytorch_fast_path(
    dtype: torch.dtype, use_mask: bool, need_weights: bool
) -> None:
    """In eval mode without grad PyTorch may take its fused fast path; the numbers still agree."""
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, dtype, batch_first=True)
    reference.eval()
    candidate.eval()
    query = sequence_first(BATCH, 5, EMBED_DIM, True, dtype)
    key_padding_mask = random_bool_masks(BATCH, 5, 5, BATCH)[0] if use_mask else None
    with torch.no_grad():
        expected = reference(
            query, query, query, key_padding_mask=key_padding_mask, need_weights=need_weights
        )
        actual = candidate(
            query, query, query, key_padding_mask=key_padding_mask, need_weights=need_weights
        )
    assert_close(actual[0], expected[0])
    if need_weights:
        assert_close(actual[1], expected[1])
    else:
        assert actual[1] is None


def test_dropout_is_off_in_eval_mode() -> None:
    """A dropout probability has no effect once the module is in eval mode."""
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, torch.float64, dropout=0.5)
    reference.eval()
    candidate.eval()
    assert_parity(reference, candidate, attention_inputs("cross", False, torch.float64))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_dropout_in_training_matches_pytorch_with_same_seed(
    batch_first: bool, need_weights: bool
) -> None:
    """Training-mode dropout drops and rescales the same probabilities as PyTorch.

    Both draw one Bernoulli mask over the (batch * heads, L, S) probabilities from the global
    generator, so reseeding before each call makes the masks equal.
    """
    reference, candidate = make_mha_pair(
        EMBED_DIM, NUM_HEADS, torch.float64, dropout=0.5, batch_first=batch_first
    )
    inputs = attention_inputs("cross", batch_first, torch.float64)
    torch.manual_seed(1)
    expected = reference(*inputs, need_weights=need_weights)
    torch.manual_seed(1)
    actual = candidate(*inputs, need_weights=need_weights)
    torch.manual_seed(1)
    without_dropout = candidate.eval()(*inputs, need_weights=need_weights)
    assert_close(actual[0], expected[0])
    # Guards against a vacuous pass: dropout must actually change the output.
    assert not torch.allclose(actual[0], without_dropout[0])
    if need_weights:
        assert_close(actual[1], expected[1])


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_kind", ["key_padding", "attn_mask"])
def test_fully_masked_query_row_is_zero_attention(mask_kind: str, need_weights: bool) -> None:
    """A query whose keys are all masked gets out_proj.bias, zero weights and finite gradients.

    PyTorch returns NaN there; torchmha deliberately attends to nothing (see DESIGN.md). The
    other rows must still equal PyTorch's.
    """
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, torch.float64, batch_first=True)
    query = leaf(torch.randn(2, 4, EMBED_DIM, dtype=torch.float64))
    key = leaf(torch.randn(2, 5, EMBED_DIM, dtype=torch.float64))
    value = leaf(torch.randn(2, 5, EMBED_DIM, dtype=torch.float64))
    # (batch, query) rows that see no key: all of batch 1, or query 1 of every batch entry.
    masked_rows = torch.zeros(2, 4, dtype=torch.bool)
    if mask_kind == "key_padding":
        masked_rows[1] = True
        masks = {"key_padding_mask": torch.tensor([[False] * 5, [True] * 5])}
    else:
        masked_rows[:, 1] = True
        masks = {"attn_mask": masked_rows[0].unsqueeze(1).expand(4, 5)}

    output, weights = candidate(query, key, value, need_weights=need_weights, **masks)
    assert torch.isfinite(output).all()
    bias = candidate.out_proj.bias.detach()
    assert_close(output.detach()[masked_rows], bias.expand(int(masked_rows.sum()), -1))
    with torch.no_grad():
        expected_output, expected_weights = reference(
            query, key, value, need_weights=need_weights, **masks
        )
    assert_close(output.detach()[~masked_rows], expected_output[~masked_rows])
    if need_weights:
        assert weights is not None and expected_weights is not None
        assert not weights.detach()[masked_rows].any()
        assert_close(weights.detach()[~masked_rows], expected_weights[~masked_rows])
    output.sum().backward()
    for tensor in (query, key, value, *candidate.parameters()):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


@pytest.mark.parametrize("weight", ["in_proj_weight", "out_proj.weight"])
def test_pruned_or_parametrized_weights_are_used(weight: str) -> None:
    """A weight that pruning or a parametrization moved out of ``_parameters`` still reaches the
    op (through the attribute), as it does in PyTorch's module."""
    torch.manual_seed(0)
    reference, candidate = make_mha_pair(8, 2, torch.float64)
    owner_name, _, name = weight.rpartition(".")
    mask = torch.rand_like(reference.get_parameter(weight)) < 0.5
    for module in (reference, candidate):
        owner = module.get_submodule(owner_name)
        prune.custom_from_mask(owner, name, mask)
        assert name not in owner._parameters  # Guards against a vacuous pass.
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    for module in (reference, candidate):
        parametrize.register_parametrization(module.out_proj, "bias", ScaledBy(2.0))
    expected, _ = reference(x, x, x)
    actual, _ = candidate(x, x, x)
    assert_close(actual, expected)


class ScaledBy(nn.Module):
    """A parametrization: the stored tensor times a constant."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, tensor: Tensor) -> Tensor:
        return tensor * self.factor
