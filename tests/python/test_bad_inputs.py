"""The catalogue of bad inputs, from Python: each one raises an exception that names the argument
and its shape (``ValueError`` for num_heads, embed_dim and dropout values, ``RuntimeError`` for
shapes, dtypes and devices), never a crash or a silent answer. Empty and non-finite inputs behave
like ``torch.nn.MultiheadAttention``. (test_op.py holds the first messages; these are the rest.)
"""

import json
import math
import subprocess
import sys
from typing import Any, Callable, Dict, Optional, Tuple, Type

import pytest
import torch
from torch import Tensor, nn

import torchmha

EMBED_DIM, NUM_HEADS, TARGET_LEN, BATCH = 8, 2, 5, 2
META = torch.device("meta")


def valid_arguments() -> Dict[str, Any]:
    """Keyword arguments of ``torchmha.multi_head_attention`` for self-attention, L=5, N=2, E=8."""
    x = torch.randn(TARGET_LEN, BATCH, EMBED_DIM)
    return {
        "query": x,
        "key": x,
        "value": x,
        "num_heads": NUM_HEADS,
        "in_proj_weight": torch.randn(3 * EMBED_DIM, EMBED_DIM),
        "in_proj_bias": torch.randn(3 * EMBED_DIM),
        "out_proj_weight": torch.randn(EMBED_DIM, EMBED_DIM),
        "out_proj_bias": torch.randn(EMBED_DIM),
    }


def separate_weights(kdim: int, vdim: int) -> Dict[str, Any]:
    """Overrides for separate projection weights with key features ``kdim``, value ``vdim``."""
    return {
        "in_proj_weight": None,
        "q_proj_weight": torch.randn(EMBED_DIM, EMBED_DIM),
        "k_proj_weight": torch.randn(EMBED_DIM, kdim),
        "v_proj_weight": torch.randn(EMBED_DIM, vdim),
        "key": torch.randn(TARGET_LEN, BATCH, kdim),
        "value": torch.randn(TARGET_LEN, BATCH, vdim),
    }


def same_input(tensor: Tensor) -> Dict[str, Tensor]:
    """Overrides that make ``tensor`` the query, key and value."""
    return {"query": tensor, "key": tensor, "value": tensor}


def embed_dim_zero() -> Dict[str, Any]:
    return {
        **same_input(torch.randn(TARGET_LEN, BATCH, 0)),
        "in_proj_weight": torch.randn(0, 0),
        "in_proj_bias": torch.randn(0),
        "out_proj_weight": torch.randn(0, 0),
        "out_proj_bias": torch.randn(0),
    }


def on_meta(**names: Any) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """Overrides that move the named valid arguments to the meta device."""

    def move(arguments: Dict[str, Any]) -> Dict[str, Any]:
        return {name: arguments[name].to(META) for name in names}

    return move


def bool_mask(*shape: int, **options: Any) -> Tensor:
    return torch.zeros(shape, dtype=torch.bool, **options)


# Each case: overrides (a dict, or a function of the valid arguments), error type, message regex.
Case = Tuple[Any, Type[Exception], str]
CATALOGUE: Dict[str, Case] = {
    # Wrong ranks.
    "query_1d": (same_input(torch.randn(EMBED_DIM)), RuntimeError, r"`query`.*of shape \[8\]"),
    "query_0d": (same_input(torch.tensor(1.0)), RuntimeError, r"`query` of shape \[\]"),
    "query_4d": (
        same_input(torch.randn(1, 5, 2, 8)),
        RuntimeError,
        r"2-D \(unbatched\) or 3-D.*\[1, 5, 2, 8\]",
    ),
    "value_2d": (
        {"value": torch.randn(5, 8)},
        RuntimeError,
        r"3-D like `query`.*`value`.*\[5, 8\]",
    ),
    # embed_dim mismatches.
    "query_embed_dim": (
        same_input(torch.randn(5, 2, 12)),
        RuntimeError,
        r"`query` with embed_dim 8.*\[5, 2, 12\]",
    ),
    "out_proj_not_square": (
        {"out_proj_weight": torch.randn(8, 9)},
        RuntimeError,
        r"square `out_proj_weight`.*\[8, 9\]",
    ),
    "in_proj_weight_shape": (
        {"in_proj_weight": torch.randn(24, 9)},
        RuntimeError,
        r"`in_proj_weight` of shape.*\[24, 8\].*but got \[24, 9\]",
    ),
    "in_proj_bias_shape": (
        {"in_proj_bias": torch.randn(8)},
        RuntimeError,
        r"`in_proj_bias`.*\[24\], but got \[8\]",
    ),
    "out_proj_bias_shape": (
        {"out_proj_bias": torch.randn(8, 1)},
        RuntimeError,
        r"`out_proj_bias`.*\[8\], but got \[8, 1\]",
    ),
    "embed_dim_zero": (embed_dim_zero(), ValueError, r"embed_dim.*\[5, 2, 0\].*must be positive"),
    # num_heads.
    "heads_not_dividing": ({"num_heads": 3}, ValueError, r"embed_dim 8.*not divisible.*heads 3"),
    "heads_above_embed_dim": ({"num_heads": 16}, ValueError, "not divisible by num_heads 16"),
    "heads_zero": ({"num_heads": 0}, ValueError, "`num_heads` must be positive, but got 0"),
    "heads_negative": ({"num_heads": -2}, ValueError, "`num_heads` must be positive, but got -2"),
    # kdim / vdim.
    "key_features_with_packed_weight": (
        {"key": torch.randn(5, 2, 6), "value": torch.randn(5, 2, 6)},
        RuntimeError,
        r"packed `in_proj_weight`.*\[5, 2, 6\].*kdim/vdim",
    ),
    "kdim_mismatch": (
        {**separate_weights(3, 5), "key": torch.randn(5, 2, 4)},
        RuntimeError,
        r"`k_proj_weight` of shape.*\[8, 4\], but got \[8, 3\]",
    ),
    "vdim_mismatch": (
        {**separate_weights(3, 5), "value": torch.randn(5, 2, 3)},
        RuntimeError,
        r"`v_proj_weight` of shape.*\[8, 3\], but got \[8, 5\]",
    ),
    "separate_weight_missing": (
        {**separate_weights(3, 5), "v_proj_weight": None},
        RuntimeError,
        "all of `q_proj_weight`, `k_proj_weight` and `v_proj_weight`",
    ),
    # Masks of wrong dtype or shape.
    "attn_mask_int32": (
        {"attn_mask": torch.zeros(5, 5, dtype=torch.int32)},
        RuntimeError,
        "bool and floating types of `attn_mask`.*Int",
    ),
    "attn_mask_uint8": (
        {"attn_mask": torch.zeros(5, 5, dtype=torch.uint8)},
        RuntimeError,
        "`attn_mask`.*Byte",
    ),
    "key_padding_mask_int32": (
        {"key_padding_mask": torch.zeros(2, 5, dtype=torch.int32)},
        RuntimeError,
        "`key_padding_mask`.*Int",
    ),
    "attn_mask_4d": (
        {"attn_mask": bool_mask(2, 2, 5, 5)},
        RuntimeError,
        r"`attn_mask` of shape \[L, S\] = \[5, 5\].*\[4, 5, 5\], but got \[2, 2, 5, 5\]",
    ),
    "attn_mask_1d": ({"attn_mask": bool_mask(5)}, RuntimeError, r"`attn_mask`.*but got \[5\]"),
    "attn_mask_groups": (
        {"attn_mask": bool_mask(2, 5, 5)},
        RuntimeError,
        r"\[batch \* num_heads, L, S\] = \[4, 5, 5\], but got \[2, 5, 5\]",
    ),
    "attn_mask_sparse": (
        {"attn_mask": torch.zeros(5, 5).to_sparse()},
        RuntimeError,
        "dense `attn_mask`.*Sparse",
    ),
    "key_padding_mask_3d": (
        {"key_padding_mask": bool_mask(2, 5, 1)},
        RuntimeError,
        r"`key_padding_mask` of shape \[batch, source length\] = \[2, 5\], but got \[2, 5, 1\]",
    ),
    "key_padding_mask_1d_batched": (
        {"key_padding_mask": bool_mask(5)},
        RuntimeError,
        r"`key_padding_mask`.*\[2, 5\], but got \[5\]",
    ),
    "key_padding_mask_2d_unbatched": (
        {**same_input(torch.randn(5, 8)), "key_padding_mask": bool_mask(1, 5)},
        RuntimeError,
        r"`key_padding_mask`.*\[5\] for unbatched `query`, but got \[1, 5\]",
    ),
    # Devices (meta stands in for CUDA: the same device checks compare them).
    "key_on_meta": (on_meta(key=1, value=1), RuntimeError, r"`key` on the device.*\(cpu\).*meta"),
    "query_on_meta": (
        on_meta(query=1),
        RuntimeError,
        r"`in_proj_weight` on the device of `query` \(meta\), but got cpu",
    ),
    "weight_on_meta": (on_meta(out_proj_weight=1), RuntimeError, "`out_proj_weight` on.*meta"),
    "attn_mask_on_meta": (
        {"attn_mask": bool_mask(5, 5, device=META)},
        RuntimeError,
        "`attn_mask` on the device.*meta",
    ),
    "key_padding_mask_on_meta": (
        {"key_padding_mask": bool_mask(2, 5, device=META)},
        RuntimeError,
        "`key_padding_mask` on the device.*meta",
    ),
    # Dtypes.
    "key_float64": (
        {"key": torch.randn(5, 2, 8, dtype=torch.float64)},
        RuntimeError,
        r"`key` to have the dtype of `query` \(Float\), but got Double",
    ),
    "bias_bfloat16": (
        {"in_proj_bias": torch.randn(24, dtype=torch.bfloat16)},
        RuntimeError,
        "`in_proj_bias`.*BFloat16",
    ),
    "query_int64": (same_input(torch.zeros(5, 2, 8, dtype=torch.int64)), RuntimeError, "Long"),
    "query_complex": (
        same_input(torch.zeros(5, 2, 8, dtype=torch.complex64)),
        RuntimeError,
        "floating point `query`.*ComplexFloat",
    ),
    "query_sparse": (
        same_input(torch.randn(5, 2, 8).to_sparse()),
        RuntimeError,
        "dense `query`.*Sparse",
    ),
    # Dropout outside [0, 1].
    "dropout_negative": ({"dropout_p": -0.1}, ValueError, r"`dropout_p` must be in \[0, 1\]"),
    "dropout_above_one": ({"dropout_p": 1.5}, ValueError, "but got 1.5"),
    "dropout_nan": ({"dropout_p": math.nan}, ValueError, "but got nan"),
    "dropout_inf": ({"dropout_p": math.inf}, ValueError, "but got inf"),
    # bias_k / bias_v.
    "bias_k_alone": (
        {"bias_k": torch.randn(1, 1, 8)},
        RuntimeError,
        "`bias_k` and `bias_v` go together",
    ),
    "bias_kv_shape": (
        {"bias_k": torch.randn(2, 4), "bias_v": torch.randn(2, 4)},
        RuntimeError,
        r"`bias_k` of shape \[1, 1, embed_dim\] = \[1, 1, 8\], but got \[2, 4\]",
    ),
}


# Weights and biases in another layout are refused by name, as inputs are.
OTHER_LAYOUTS = {"sparse": (Tensor.to_sparse, "Sparse"), "mkldnn": (Tensor.to_mkldnn, "Mkldnn")}
WEIGHTS_AND_BIASES = {
    "in_proj_weight": {},
    "in_proj_bias": {},
    "out_proj_weight": {},
    "out_proj_bias": {},
    "bias_k": {"bias_k": torch.randn(1, 1, 8), "bias_v": torch.randn(1, 1, 8)},
    "bias_v": {"bias_k": torch.randn(1, 1, 8), "bias_v": torch.randn(1, 1, 8)},
    "q_proj_weight": separate_weights(3, 5),
    "k_proj_weight": separate_weights(3, 5),
    "v_proj_weight": separate_weights(3, 5),
}


def in_layout(name: str, base: Dict[str, Any], convert: Callable[[Tensor], Tensor]) -> Any:
    """Overrides: ``base``, then the argument ``name`` converted to another layout."""

    def overrides(arguments: Dict[str, Any]) -> Dict[str, Any]:
        changed = {**base}
        changed[name] = convert({**arguments, **base}[name])
        return changed

    return overrides


for _name, _base in WEIGHTS_AND_BIASES.items():
    for _layout, (_convert, _printed) in OTHER_LAYOUTS.items():
        CATALOGUE[f"{_name}_{_layout}"] = (
            in_layout(_name, _base, _convert),
            RuntimeError,
            f"expected a dense `{_name}`, but got a {_printed} tensor",
        )

CATALOGUE.update(
    {
        # Printed as given, not rounded to six digits ("but got 1").
        "dropout_just_above_one": ({"dropout_p": 1.0000001}, ValueError, r"but got 1\.0000001$"),
        # 3 * embed_dim would overflow int64; a one-element view has the size without the memory.
        "embed_dim_near_2_62": (
            same_input(torch.zeros(1, 1, 1).expand(1, 1, 2**62)),
            ValueError,
            r"embed_dim 4611686018427387904 \(the last dimension of `query`.*\) is too large",
        ),
    }
)


def call_op(overrides: Any) -> Tuple[Tensor, Optional[Tensor]]:
    arguments = valid_arguments()
    arguments.update(overrides(arguments) if callable(overrides) else overrides)
    return torchmha.multi_head_attention(**arguments)


@pytest.mark.parametrize("case", sorted(CATALOGUE))
def test_bad_input_raises_a_clear_error(case: str) -> None:
    """The op raises the documented type, with its name prefix, the argument and the shapes."""
    overrides, error_type, pattern = CATALOGUE[case]
    with pytest.raises(error_type, match=pattern) as raised:
        call_op(overrides)
    assert str(raised.value).startswith("torchmha.multi_head_attention: ")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_nested_key_is_refused_by_name() -> None:
    nested = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(4, 8)])
    with pytest.raises(RuntimeError, match="dense `key`, but got a nested tensor"):
        call_op({"key": nested, "value": nested})


@pytest.mark.parametrize(
    "module_type", [torchmha.MultiHeadAttention, torchmha.cpp.MultiHeadAttention]
)
@pytest.mark.parametrize(
    "arguments, pattern",
    [
        ((0, 2), "embed_dim.*0"),
        ((8, -1), "num_heads.*-1"),
        ((8, 3), "divisible by num_heads 3"),
        ((8, 2, 1.5), "dropout.*1.5"),
        ((2**62, 1), "embed_dim.*4611686018427387904"),
    ],
)
def test_bad_module_options_raise_value_error(
    module_type: Type[nn.Module], arguments: Tuple[Any, ...], pattern: str
) -> None:
    """Both modules refuse the options ``torch.nn.MultiheadAttention`` refuses."""
    with pytest.raises(ValueError, match=pattern):
        module_type(*arguments)


@pytest.mark.parametrize(
    "module_type, arguments, pattern",
    [
        (torchmha.cpp.MultiHeadAttention, (8, 2, 1.0000001), r"dropout.*got 1\.0000001$"),
        (torchmha.cpp.TextbookMultiHeadAttention, (2, 8, 1.0000001), r"dropout.*got 1\.0000001$"),
        (torchmha.cpp.MultiHeadAttention, (2**62, 1), "embed_dim=4611686018427387904 is too large"),
    ],
)
def test_cpp_module_options_are_printed_as_given(
    module_type: Type[nn.Module], arguments: Tuple[Any, ...], pattern: str
) -> None:
    """The C++ modules print a refused value with all its digits, and refuse an ``embed_dim``
    whose ``3 * embed_dim`` overflows before computing it."""
    with pytest.raises(ValueError, match=pattern):
        module_type(*arguments)


BLOCK_BYTES_SCRIPT = """
import json, os, sys
import torch, torchmha
sys.path.insert(0, os.path.dirname(sys.argv[1]))
from test_bad_inputs import valid_arguments
results = []
for value in sys.argv[2:]:
    os.environ["TORCHMHA_SCORE_BLOCK_BYTES"] = value
    try:
        torchmha.multi_head_attention(**valid_arguments(), need_weights=True)
        results.append(None)
    except Exception as error:
        results.append([type(error).__name__, str(error)])
print(json.dumps(results))
"""


def test_score_block_bytes_setting_is_parsed_whole_or_refused() -> None:
    """``TORCHMHA_SCORE_BLOCK_BYTES`` (read once per process, so in a fresh one) refuses garbage,
    trailing characters, zero, negative and out-of-range values with a message naming it and the
    value; a valid value, given last since the first accepted value is kept, then works."""
    refused = ["abc", "12abc", "0", "-5", "99999999999999999999", str(2**41), ""]
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_BYTES_SCRIPT, __file__, *refused, "96"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.splitlines()[-1])
    for value, outcome in zip(refused, outcomes):
        assert outcome is not None, f"{value!r} was accepted"
        error_type, message = outcome
        assert error_type == "ValueError", (value, outcome)
        assert message.startswith("torchmha.multi_head_attention: "), (value, message)
        assert "TORCHMHA_SCORE_BLOCK_BYTES must be a whole number of bytes from 1 to" in message
        assert f'but got "{value}"' in message, (value, message)
    assert outcomes[-1] is None, outcomes[-1]


@pytest.mark.parametrize(
    "module_type", [torchmha.MultiHeadAttention, torchmha.cpp.MultiHeadAttention]
)
def test_modules_name_the_bad_argument(module_type: Type[nn.Module]) -> None:
    """A module's forward reaches the same checks: here a key of the wrong feature size."""
    module = module_type(8, 2, kdim=3, vdim=5)
    with pytest.raises(RuntimeError, match=r"`k_proj_weight` of shape.*\[8, 4\], but got \[8, 3\]"):
        module(torch.randn(4, 2, 8), torch.randn(6, 2, 4), torch.randn(6, 2, 5))


def test_everything_on_meta_gives_shapes() -> None:
    """No data, no crash: the op's shapes propagate on the meta device."""
    output, weights = call_op(
        lambda arguments: {k: v.to(META) for k, v in arguments.items() if isinstance(v, Tensor)}
    )
    assert output.is_meta and output.shape == (TARGET_LEN, BATCH, EMBED_DIM)
    assert weights is not None and weights.shape == (BATCH, TARGET_LEN, TARGET_LEN)


def test_dropout_of_one_drops_every_probability() -> None:
    """``dropout_p=1`` is valid: no attention survives, the output is the output bias."""
    arguments = valid_arguments()
    for need_weights in (True, False):
        output, _ = torchmha.multi_head_attention(
            **arguments, dropout_p=1.0, training=True, need_weights=need_weights
        )
        assert torch.equal(output, arguments["out_proj_bias"].expand_as(output))


def reference_pair(**kwargs: Any) -> Tuple[nn.MultiheadAttention, torchmha.MultiHeadAttention]:
    """PyTorch's module and torchmha's with the same random weights, in eval mode."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, **kwargs).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_()
    candidate = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **kwargs).eval()
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate


def assert_same_results(
    reference: nn.Module, candidate: nn.Module, inputs: Tuple[Tensor, ...], **kwargs: Any
) -> Tuple[Tensor, Optional[Tensor]]:
    """Equal shapes and values (NaN where PyTorch has NaN) of both modules' results."""
    expected = reference(*inputs, **kwargs)
    actual = candidate(*inputs, **kwargs)
    for got, want in zip(actual, expected):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want, equal_nan=True, atol=1e-5, rtol=1e-4)
    return actual


EMPTY_SHAPES = {
    "batch_0": ((5, 0, 8), (4, 0, 8)),
    "no_queries": ((0, 2, 8), (4, 2, 8)),
    "no_keys": ((5, 2, 8), (0, 2, 8)),
    "nothing": ((0, 0, 8), (0, 0, 8)),
    "unbatched_nothing": ((0, 8), (0, 8)),
    "unbatched_no_keys": ((5, 8), (0, 8)),
}


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("shapes", sorted(EMPTY_SHAPES))
def test_empty_dimensions_behave_like_pytorch(shapes: str, need_weights: bool) -> None:
    """Batch 0, no queries or no keys: PyTorch's shapes and values (no keys: the output bias)."""
    query_shape, key_shape = EMPTY_SHAPES[shapes]
    query, key = torch.randn(query_shape), torch.randn(key_shape)
    output, _ = assert_same_results(*reference_pair(), (query, key, key), need_weights=need_weights)
    assert output.shape == query.shape


@pytest.mark.parametrize("need_weights", [True, False])
def test_empty_dimensions_with_masks(need_weights: bool) -> None:
    """Where PyTorch itself fails on empty masked inputs (need_weights=False), torchmha gives
    the shapes and values of the need_weights=True path, which PyTorch does compute."""
    reference, candidate = reference_pair()
    cases = [
        ((5, 0, 8), (4, 0, 8), {"attn_mask": bool_mask(0, 5, 4)}),
        ((5, 0, 8), (4, 0, 8), {"key_padding_mask": bool_mask(0, 4)}),
        ((5, 2, 8), (0, 2, 8), {"key_padding_mask": bool_mask(2, 0)}),
        ((5, 8), (0, 8), {"key_padding_mask": bool_mask(0)}),
    ]
    for query_shape, key_shape, masks in cases:
        query, key = torch.randn(query_shape), torch.randn(key_shape)
        expected, _ = reference(query, key, key, need_weights=True, **masks)
        output, _ = candidate(query, key, key, need_weights=need_weights, **masks)
        torch.testing.assert_close(output, expected)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("where", ["query", "key", "float_mask"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_behave_like_pytorch(bad: float, where: str, need_weights: bool) -> None:
    """Non-finite inputs and masks spread exactly where PyTorch's do, with no error."""
    reference, candidate = reference_pair()
    x = torch.randn(5, 2, 8)
    query, key, attn_mask = x.clone(), x.clone(), torch.zeros(5, 5)
    {"query": query[1, 0], "key": key[2, 1], "float_mask": attn_mask[0]}[where][1] = bad
    assert_same_results(
        reference,
        candidate,
        (query, key, key),
        attn_mask=attn_mask,
        need_weights=need_weights,
    )
