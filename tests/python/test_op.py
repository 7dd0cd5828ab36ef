"""The op ``torch.ops.torchmha.multi_head_attention`` and its typed wrapper, called directly."""

import subprocess
import sys
from typing import Any, Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import Tensor

import torchmha

EMBED_DIM, NUM_HEADS, BATCH, TARGET_LEN, SOURCE_LEN = 4, 2, 2, 3, 5
F64 = torch.float64


def packed_weights(embed_dim: int = EMBED_DIM, dtype: torch.dtype = F64) -> Dict[str, Tensor]:
    """Random ``in_proj_weight``/``in_proj_bias``/``out_proj_*`` as the op takes them."""
    return {
        "in_proj_weight": torch.randn(3 * embed_dim, embed_dim, dtype=dtype) * 0.5,
        "in_proj_bias": torch.randn(3 * embed_dim, dtype=dtype) * 0.5,
        "out_proj_weight": torch.randn(embed_dim, embed_dim, dtype=dtype) * 0.5,
        "out_proj_bias": torch.randn(embed_dim, dtype=dtype) * 0.5,
    }


def causal(target_len: int, source_len: int) -> Tensor:
    """PyTorch's convention: True above the diagonal, i.e. where attention is not allowed."""
    return torch.ones(target_len, source_len, dtype=torch.bool).triu(1)


def pytorch_reference(
    query: Tensor, key: Tensor, value: Tensor, weights: Dict[str, Tensor], **kwargs: Any
) -> Tuple[Tensor, Optional[Tensor]]:
    """``F.multi_head_attention_forward`` on sequence-first inputs with packed weights."""
    return F.multi_head_attention_forward(
        query,
        key,
        value,
        EMBED_DIM,
        NUM_HEADS,
        weights["in_proj_weight"],
        weights["in_proj_bias"],
        None,
        None,
        False,
        0.0,
        weights["out_proj_weight"],
        weights["out_proj_bias"],
        training=False,
        **kwargs,
    )


def call_packed(
    query: Tensor, key: Tensor, value: Tensor, weights: Dict[str, Tensor], **kwargs: Any
) -> Tuple[Tensor, Optional[Tensor]]:
    """``torchmha.multi_head_attention`` with packed weights, positional as in its signature."""
    return torchmha.multi_head_attention(
        query,
        key,
        value,
        NUM_HEADS,
        weights["in_proj_weight"],
        weights["in_proj_bias"],
        out_proj_weight=weights["out_proj_weight"],
        out_proj_bias=weights["out_proj_bias"],
        **kwargs,
    )


def test_import_torchmha_first_works() -> None:
    """``import torchmha`` in a fresh interpreter, before torch, loads the extension and the op."""
    program = "import torchmha, torch; print(torch.ops.torchmha.multi_head_attention.default)"
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torchmha.multi_head_attention.default" in result.stdout


def test_op_is_registered_with_its_schema() -> None:
    """Importing torchmha registers the op in the dispatcher with the documented schema."""
    packet = torch.ops.torchmha.multi_head_attention
    schema = packet.default._schema
    assert schema.name == "torchmha::multi_head_attention"
    names = [argument.name for argument in schema.arguments]
    assert names[:4] == ["query", "key", "value", "num_heads"]
    assert "key_padding_mask" in names and "is_causal" in names and "batch_first" in names
    assert len(schema.returns) == 2


@pytest.mark.parametrize("need_weights", [True, False])
def test_wrapper_matches_pytorch_and_returns_none_without_weights(need_weights: bool) -> None:
    """The wrapper gives PyTorch's output, and ``None`` for the weights unless asked."""
    weights = packed_weights()
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    key = torch.randn(SOURCE_LEN, BATCH, EMBED_DIM, dtype=F64)
    output, attn_weights = call_packed(query, key, key, weights, need_weights=need_weights)
    expected, expected_weights = pytorch_reference(
        query, key, key, weights, need_weights=need_weights
    )
    assert_close(output, expected)
    if need_weights:
        assert_close(attn_weights, expected_weights)
    else:
        assert attn_weights is None


@pytest.mark.parametrize("need_weights", [True, False])
def test_gradcheck_packed_weights_with_bool_mask(need_weights: bool) -> None:
    """Analytical gradients w.r.t. inputs and packed weights equal finite differences."""
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64, requires_grad=True)
    key = torch.randn(SOURCE_LEN, BATCH, EMBED_DIM, dtype=F64, requires_grad=True)
    value = torch.randn(SOURCE_LEN, BATCH, EMBED_DIM, dtype=F64, requires_grad=True)
    weights = {name: t.requires_grad_() for name, t in packed_weights().items()}
    attn_mask = torch.rand(TARGET_LEN, SOURCE_LEN) < 0.4
    attn_mask[:, 0] = False  # Every query keeps one key, away from the zero-attention rule.

    def attention(q: Tensor, k: Tensor, v: Tensor, *parameters: Tensor) -> Tuple[Tensor, ...]:
        named = dict(zip(weights.keys(), parameters))
        output, attn_weights = call_packed(
            q, k, v, named, attn_mask=attn_mask, need_weights=need_weights
        )
        return (output,) if attn_weights is None else (output, attn_weights)

    assert torch.autograd.gradcheck(attention, (query, key, value, *weights.values()))


@pytest.mark.parametrize("need_weights", [True, False])
def test_gradcheck_separate_weights_with_bool_masks(need_weights: bool) -> None:
    """The same with q/k/v_proj_weight (kdim, vdim != embed_dim), bias_k/bias_v and padding."""
    kdim, vdim = 3, 5
    query = torch.randn(BATCH, TARGET_LEN, EMBED_DIM, dtype=F64, requires_grad=True)
    key = torch.randn(BATCH, SOURCE_LEN, kdim, dtype=F64, requires_grad=True)
    value = torch.randn(BATCH, SOURCE_LEN, vdim, dtype=F64, requires_grad=True)
    parameters = {
        "q_proj_weight": torch.randn(EMBED_DIM, EMBED_DIM, dtype=F64),
        "k_proj_weight": torch.randn(EMBED_DIM, kdim, dtype=F64),
        "v_proj_weight": torch.randn(EMBED_DIM, vdim, dtype=F64),
        "in_proj_bias": torch.randn(3 * EMBED_DIM, dtype=F64),
        "out_proj_weight": torch.randn(EMBED_DIM, EMBED_DIM, dtype=F64),
        "out_proj_bias": torch.randn(EMBED_DIM, dtype=F64),
        "bias_k": torch.randn(1, 1, EMBED_DIM, dtype=F64),
        "bias_v": torch.randn(1, 1, EMBED_DIM, dtype=F64),
    }
    parameters = {name: (t * 0.5).requires_grad_() for name, t in parameters.items()}
    key_padding_mask = torch.tensor([[False, True, False, True, True], [False] * 5])
    attn_mask = torch.rand(TARGET_LEN, SOURCE_LEN) < 0.4

    def attention(q: Tensor, k: Tensor, v: Tensor, *tensors: Tensor) -> Tuple[Tensor, ...]:
        named = dict(zip(parameters.keys(), tensors))
        output, attn_weights = torchmha.multi_head_attention(
            q,
            k,
            v,
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
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=need_weights,
            average_attn_weights=False,
            batch_first=True,
        )
        return (output,) if attn_weights is None else (output, attn_weights)

    assert torch.autograd.gradcheck(attention, (query, key, value, *parameters.values()))


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("source_len", [TARGET_LEN, SOURCE_LEN])
def test_is_causal_without_mask_is_causal_attention(source_len: int, need_weights: bool) -> None:
    """``is_causal=True`` alone equals an explicit ``triu(1)`` mask, in torchmha and PyTorch."""
    weights = packed_weights()
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    key = (
        query if source_len == TARGET_LEN else torch.randn(source_len, BATCH, EMBED_DIM, dtype=F64)
    )
    mask = causal(TARGET_LEN, source_len)
    hinted = call_packed(query, key, key, weights, is_causal=True, need_weights=need_weights)
    explicit = call_packed(query, key, key, weights, attn_mask=mask, need_weights=need_weights)
    expected = pytorch_reference(query, key, key, weights, attn_mask=mask, need_weights=True)
    assert_close(hinted[0], expected[0])
    assert_close(explicit[0], expected[0])
    if need_weights:
        assert_close(hinted[1], expected[1])
        assert_close(explicit[1], expected[1])


def test_is_causal_without_mask_combines_with_key_padding() -> None:
    """The implied causal mask is merged with a key padding mask, as an explicit one would be."""
    weights = packed_weights()
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    key_padding_mask = torch.tensor([[False, False, True], [False, True, True]])
    hinted, _ = call_packed(
        query, query, query, weights, is_causal=True, key_padding_mask=key_padding_mask
    )
    expected, _ = pytorch_reference(
        query,
        query,
        query,
        weights,
        attn_mask=causal(TARGET_LEN, TARGET_LEN),
        key_padding_mask=key_padding_mask,
    )
    assert_close(hinted, expected)


@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_unbatched(need_weights: bool) -> None:
    """The implied causal mask also fits 2-D ``(L, E)`` inputs."""
    weights = packed_weights()
    query = torch.randn(TARGET_LEN, EMBED_DIM, dtype=F64)
    hinted = call_packed(query, query, query, weights, is_causal=True, need_weights=need_weights)
    expected = pytorch_reference(
        query, query, query, weights, attn_mask=causal(TARGET_LEN, TARGET_LEN)
    )
    assert_close(hinted[0], expected[0])
    if need_weights:
        assert_close(hinted[1], expected[1])


def test_embed_dim_not_divisible_by_num_heads_raises_value_error() -> None:
    """Both the op and the module refuse a head count that does not divide embed_dim."""
    weights = packed_weights(embed_dim=6)
    query = torch.randn(TARGET_LEN, BATCH, 6, dtype=F64)
    with pytest.raises(ValueError, match="embed_dim 6.*not divisible by num_heads 4"):
        torchmha.multi_head_attention(
            query,
            query,
            query,
            4,
            weights["in_proj_weight"],
            None,
            out_proj_weight=weights["out_proj_weight"],
            out_proj_bias=None,
        )
    with pytest.raises(ValueError, match="divisible"):
        torchmha.MultiHeadAttention(6, 4)


def test_wrong_attn_mask_shape_names_the_mask_and_its_shape() -> None:
    """A mask of the wrong shape is refused with its name, the expected and the given shape."""
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    with pytest.raises(RuntimeError, match=r"attn_mask.*\[3, 3\].*but got \[3, 4\]"):
        call_packed(query, query, query, packed_weights(), attn_mask=causal(3, 4))


def test_wrong_key_padding_mask_shape_names_the_mask() -> None:
    """A key padding mask of another batch size is refused with both shapes."""
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    bad_mask = torch.zeros(BATCH + 1, TARGET_LEN, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"key_padding_mask.*\[2, 3\].*but got \[3, 3\]"):
        call_packed(query, query, query, packed_weights(), key_padding_mask=bad_mask)


@pytest.mark.parametrize("mask_name", ["key_padding_mask", "attn_mask"])
def test_integer_mask_dtype_is_refused(mask_name: str) -> None:
    """Only bool and floating masks are accepted; the message names the mask and the dtype."""
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    shape = (BATCH, TARGET_LEN) if mask_name == "key_padding_mask" else (TARGET_LEN, TARGET_LEN)
    mask = torch.zeros(shape, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=f"{mask_name}.*Long"):
        call_packed(query, query, query, packed_weights(), **{mask_name: mask})


def test_key_and_value_of_different_lengths_are_refused() -> None:
    """Keys and values pair up position by position, so their lengths must agree."""
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    key = torch.randn(SOURCE_LEN, BATCH, EMBED_DIM, dtype=F64)
    value = torch.randn(SOURCE_LEN - 1, BATCH, EMBED_DIM, dtype=F64)
    with pytest.raises(RuntimeError, match=r"same sequence length.*\[5, 2, 4\].*\[4, 2, 4\]"):
        call_packed(query, key, value, packed_weights())


def test_key_dim_other_than_embed_dim_needs_separate_weights() -> None:
    """A packed weight cannot project a key whose feature size differs from embed_dim."""
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    key = torch.randn(SOURCE_LEN, BATCH, 3, dtype=F64)
    with pytest.raises(RuntimeError, match=r"in_proj_weight.*key.*\[5, 2, 3\]"):
        call_packed(query, key, key, packed_weights())


def test_separate_weight_of_wrong_shape_is_refused() -> None:
    """A ``k_proj_weight`` that does not match ``key``'s feature size is named with its shape."""
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    with pytest.raises(RuntimeError, match=r"k_proj_weight.*\[4, 4\].*but got \[4, 3\]"):
        torchmha.multi_head_attention(
            query,
            query,
            query,
            NUM_HEADS,
            None,
            None,
            out_proj_weight=torch.randn(EMBED_DIM, EMBED_DIM, dtype=F64),
            q_proj_weight=torch.randn(EMBED_DIM, EMBED_DIM, dtype=F64),
            k_proj_weight=torch.randn(EMBED_DIM, 3, dtype=F64),
            v_proj_weight=torch.randn(EMBED_DIM, EMBED_DIM, dtype=F64),
        )


def test_weight_of_other_dtype_is_refused() -> None:
    """Weights must have the query's dtype; the message names the weight and both dtypes."""
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    weights = packed_weights(dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"in_proj_weight.*Double.*Float"):
        call_packed(query, query, query, weights)


def opcheck_cases() -> Dict[str, Tuple[Tuple[Any, ...], Dict[str, Any]]]:
    """Representative (args, kwargs) of the op: self- and cross-attention, masks, both weight
    modes, separate weights with bias_k/bias_v and zero attention."""
    query = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64, requires_grad=True)
    key = torch.randn(SOURCE_LEN, BATCH, EMBED_DIM, dtype=F64, requires_grad=True)
    value = torch.randn(SOURCE_LEN, BATCH, EMBED_DIM, dtype=F64, requires_grad=True)
    packed = {name: t.requires_grad_() for name, t in packed_weights().items()}
    packed_args = (packed["in_proj_weight"], packed["in_proj_bias"], None, None, None)
    out_args = (packed["out_proj_weight"], packed["out_proj_bias"])
    separate = tuple(
        torch.randn(EMBED_DIM, EMBED_DIM, dtype=F64, requires_grad=True) for _ in range(3)
    )
    bias_kv = {
        "bias_k": torch.randn(1, 1, EMBED_DIM, dtype=F64, requires_grad=True),
        "bias_v": torch.randn(1, 1, EMBED_DIM, dtype=F64, requires_grad=True),
    }
    key_padding_mask = torch.tensor([[False, True, False, False, True], [False] * 5])
    return {
        "self_causal_mask": (
            (query, query, query, NUM_HEADS, *packed_args, *out_args),
            {"attn_mask": causal(TARGET_LEN, TARGET_LEN)},
        ),
        "cross_padding_no_weights": (
            (query, key, value, NUM_HEADS, *packed_args, *out_args),
            {"key_padding_mask": key_padding_mask, "need_weights": False},
        ),
        "separate_bias_kv_zero_attn_float_mask": (
            (query, key, value, NUM_HEADS, None, packed["in_proj_bias"], *separate, *out_args),
            {
                **bias_kv,
                "add_zero_attn": True,
                "attn_mask": torch.randn(TARGET_LEN, SOURCE_LEN, dtype=F64),
                "average_attn_weights": False,
            },
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["self_causal_mask", "cross_padding_no_weights", "separate_bias_kv_zero_attn_float_mask"],
)
def test_opcheck(case: str) -> None:
    """``torch.library.opcheck``: schema, autograd registration, fake tensor and AOT dispatch."""
    args, kwargs = opcheck_cases()[case]
    result = torch.library.opcheck(torch.ops.torchmha.multi_head_attention.default, args, kwargs)
    assert set(result.values()) == {"SUCCESS"}, result


def test_functional_takes_the_schema_order() -> None:
    """``torchmha.multi_head_attention`` names the op schema's arguments in the schema's order,
    so positional calls mean the same thing through the wrapper and through ``torch.ops``."""
    import inspect

    schema = torch.ops.torchmha.multi_head_attention.default._schema
    wrapper = list(inspect.signature(torchmha.multi_head_attention).parameters)
    assert wrapper == [argument.name for argument in schema.arguments]

    weights = packed_weights()
    x = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    positional = (x, x, x, NUM_HEADS, weights["in_proj_weight"], weights["in_proj_bias"], None,
                  None, None, weights["out_proj_weight"], weights["out_proj_bias"])  # fmt: skip
    ours = torchmha.multi_head_attention(*positional, training=False)
    expected = torch.ops.torchmha.multi_head_attention(*positional, training=False)
    assert_close(ours[0], expected[0])
    assert_close(ours[0], pytorch_reference(x, x, x, weights)[0])


def test_functional_refuses_the_old_argument_order() -> None:
    """A call in the order of torchmha 0.1's wrapper (out_proj_weight right after in_proj_bias)
    is refused with the schema's order spelled out, never run with its weights misplaced."""
    weights = packed_weights()
    x = torch.randn(TARGET_LEN, BATCH, EMBED_DIM, dtype=F64)
    with pytest.raises(TypeError, match="`out_proj_weight` is required.*q_proj_weight"):
        torchmha.multi_head_attention(
            x, x, x, NUM_HEADS, weights["in_proj_weight"], weights["in_proj_bias"],
            weights["out_proj_weight"], weights["out_proj_bias"],
        )  # fmt: skip


def test_pytorch_spelling_is_the_same_class() -> None:
    """``from torchmha import MultiheadAttention`` is a one-word swap for PyTorch's module."""
    assert torchmha.MultiheadAttention is torchmha.MultiHeadAttention
    assert "MultiheadAttention" in torchmha.__all__
