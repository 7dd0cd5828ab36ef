"""Bad grouped-query and rotary input: a ValueError (values) or RuntimeError (shapes, dtypes,
devices) that names the argument, never a crash or a silent wrong answer; modules unchanged."""

import math
from typing import Any, Dict

import pytest
import torch

import torchmha

EMBED_DIM, NUM_HEADS = 16, 4  # head_dim 4


@pytest.mark.parametrize(
    "options, names",
    [
        ({"num_kv_heads": 0}, "num_kv_heads"),
        ({"num_kv_heads": -2}, "num_kv_heads"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"num_kv_heads": 8}, "num_kv_heads"),
        ({"rope_theta": 0.0}, "rope_theta"),
        ({"rope_theta": -10.0}, "rope_theta"),
        ({"rope_theta": math.nan}, "rope_theta"),
        ({"rope_theta": math.inf}, "rope_theta"),
        ({"rope_theta": 1e4, "rotary_dim": 3}, "rotary_dim"),
        ({"rope_theta": 1e4, "rotary_dim": 0}, "rotary_dim"),
        ({"rope_theta": 1e4, "rotary_dim": 6}, "rotary_dim"),
        ({"rotary_dim": 2}, "rotary_dim"),
        ({"rotary_interleaved": True}, "rotary_interleaved"),
    ],
)
def test_bad_options_are_refused_at_construction(options: Dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **options)


def test_odd_head_dim_needs_an_even_rotary_dim() -> None:
    with pytest.raises(ValueError, match="head_dim 3 is odd: give an even rotary_dim"):
        torchmha.MultiHeadAttention(12, 4, rope_theta=1e4)
    torchmha.MultiHeadAttention(12, 4, rope_theta=1e4, rotary_dim=2)


def op_call(**overrides: Any):
    """The op on a valid grouped, rotary self-attention call, with `overrides` applied."""
    module = torchmha.MultiHeadAttention(
        EMBED_DIM, NUM_HEADS, batch_first=True, num_kv_heads=2, rope_theta=1e4
    )
    x = torch.randn(2, 5, EMBED_DIM)
    arguments: Dict[str, Any] = dict(
        query=x,
        key=x,
        value=x,
        num_heads=NUM_HEADS,
        in_proj_weight=module.in_proj_weight,
        in_proj_bias=module.in_proj_bias,
        out_proj_weight=module.out_proj.weight,
        out_proj_bias=module.out_proj.bias,
        batch_first=True,
        num_kv_heads=2,
        rope_theta=1e4,
    )
    arguments.update(overrides)
    return torchmha.multi_head_attention(**arguments)


def test_valid_call_runs() -> None:
    assert op_call(positions=torch.arange(5))[0].isfinite().all()


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            {"num_kv_heads": 3},
            ValueError,
            "`num_kv_heads` must divide num_heads 4 (1 <= num_kv_heads <= num_heads), but got 3",
        ),
        (
            {"num_kv_heads": 1},
            RuntimeError,
            "expected `in_proj_weight` of shape [embed_dim + 2 * kv_dim, embed_dim] = [24, 16] "
            "for `query` of shape [2, 5, 16] (kv_dim = num_kv_heads * embed_dim / num_heads = "
            "1 * 16 / 4), but got [32, 16]",
        ),
        (
            {"rope_theta": math.nan},
            ValueError,
            "`rope_theta` must be positive and finite, but got nan",
        ),
        (
            {"rotary_dim": 5},
            ValueError,
            "`rotary_dim` must be even and in [2, head_dim] = [2, 4], but got 5",
        ),
        (
            {"positions": torch.arange(5.0)},
            RuntimeError,
            "expected integer `positions`, but got Float",
        ),
        (
            {"positions": torch.arange(6)},
            RuntimeError,
            "expected `positions` of shape [L] = [5] or [batch, L] = [2, 5], but got [6]",
        ),
        (
            {"positions": torch.arange(5).to("meta")},
            RuntimeError,
            "expected `positions` on the device of `query` (cpu), but got meta",
        ),
        (
            {"positions": torch.arange(5) - 1},
            RuntimeError,
            "`positions` must be non-negative, but got -1",
        ),
        (
            {"rope_theta": None, "positions": torch.arange(5)},
            RuntimeError,
            "`positions` places rotary embeddings, which need `rope_theta`",
        ),
        (
            {
                "key": torch.randn(2, 6, EMBED_DIM),
                "value": torch.randn(2, 6, EMBED_DIM),
                "positions": torch.arange(5),
            },
            RuntimeError,
            "so `key` needs the query's length 5, but got `key` of shape [2, 6, 16]",
        ),
    ],
)
def test_op_refuses_by_name(overrides: Dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error) as raised:
        op_call(**overrides)
    assert type(raised.value) is error
    assert str(raised.value).startswith("torchmha.multi_head_attention: ")
    assert message in str(raised.value)


@pytest.mark.parametrize("module_type", ["python", "cpp"])
def test_state_dict_of_other_kv_heads_is_refused_and_module_kept(module_type: str) -> None:
    """A checkpoint with 4 key/value heads does not load into a module with 2: the message
    names the key and both shapes, and no tensor of the module changed."""
    make = (
        torchmha.MultiHeadAttention if module_type == "python" else torchmha.cpp.MultiHeadAttention
    )
    grouped = make(EMBED_DIM, NUM_HEADS, num_kv_heads=2)
    before = {name: tensor.clone() for name, tensor in grouped.state_dict().items()}
    full = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS).state_dict()
    with pytest.raises(RuntimeError) as raised:
        grouped.load_state_dict(full)
    message = str(raised.value)
    assert "in_proj_weight" in message and "[48, 16]" in message and "[32, 16]" in message
    assert "in_proj_bias" in message and "[48]" in message and "[32]" in message
    for name, tensor in grouped.state_dict().items():
        assert torch.equal(tensor, before[name]), name
