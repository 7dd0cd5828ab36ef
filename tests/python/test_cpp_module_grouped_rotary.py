"""The bound C++ module (``torchmha.cpp.MultiHeadAttention``) with grouped-query attention and
rotary embeddings: the same options, parameters and numbers as the Python
``torchmha.MultiHeadAttention``, and copies (deepcopy, pickle, torch.save) that keep the options.
"""

from typing import Any, Dict, Optional, Tuple

import pytest
import torch
from conftest import assert_parity, randomize_parameters, sequence_first
from test_cpp_module_python_protocols import COPIES, pickled
from torch import Tensor, nn

import torchmha

EMBED_DIM, NUM_HEADS, BATCH, LENGTH = 16, 4, 3, 5

# Each new option away from its default, alone and together with the older options.
CONFIGS: Dict[str, Dict[str, Any]] = {
    "grouped": {"num_kv_heads": 2},
    "multi_query": {"num_kv_heads": 1},
    "rotary_half": {"rope_theta": 10000.0},
    "grouped_rotary_partial_interleaved": {
        "num_kv_heads": 2,
        "rope_theta": 10000.0,
        "rotary_dim": 2,
        "rotary_interleaved": True,
    },
    "grouped_rotary_partial_half_bias_kv_zero_attn_batch_first": {
        "num_kv_heads": 2,
        "rope_theta": 500.0,
        "rotary_dim": 2,
        "add_bias_kv": True,
        "add_zero_attn": True,
        "batch_first": True,
    },
    "multi_query_rotary_separate_no_bias": {
        "num_kv_heads": 1,
        "rope_theta": 10000.0,
        "rotary_interleaved": True,
        "kdim": 5,
        "vdim": 3,
        "bias": False,
    },
}


def make_pair(
    **options: Any,
) -> Tuple[torchmha.MultiHeadAttention, torchmha.cpp.MultiHeadAttention]:
    """A random float64 Python torchmha module and the C++ module loaded from its state dict."""
    reference = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, dtype=torch.float64, **options)
    randomize_parameters(reference)
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **options)
    candidate.to(torch.float64)
    candidate.load_state_dict(reference.state_dict(), strict=True)
    return reference, candidate


def self_attention_input(options: Dict[str, Any], unbatched: bool = False) -> Tensor:
    if unbatched:
        return torch.randn(LENGTH, EMBED_DIM, dtype=torch.float64)
    return sequence_first(
        BATCH, LENGTH, EMBED_DIM, options.get("batch_first", False), torch.float64
    )


def row_positions() -> Tensor:
    """(N, L) positions that start at different offsets and skip some, as left padding does."""
    return torch.randint(0, 4, (BATCH, 1)) + torch.arange(LENGTH) * 2


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_state_dict_keys_and_shapes_equal_python_module(config: Dict[str, Any]) -> None:
    """The C++ parameters have the Python module's names and (kv_dim) shapes."""
    reference = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **config)
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **config)
    expected = {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in candidate.state_dict().items()} == expected


def test_grouped_parameter_shapes() -> None:
    """kv_dim = num_kv_heads * head_dim rows for the key and value projections."""
    packed = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, add_bias_kv=True, num_kv_heads=2)
    shapes = {name: tuple(t.shape) for name, t in packed.state_dict().items()}
    assert shapes["in_proj_weight"] == (EMBED_DIM + 2 * 8, EMBED_DIM)
    assert shapes["in_proj_bias"] == (EMBED_DIM + 2 * 8,)
    assert shapes["bias_k"] == shapes["bias_v"] == (1, 1, 8)
    assert shapes["out_proj.weight"] == (EMBED_DIM, EMBED_DIM)
    separate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, kdim=5, vdim=3, num_kv_heads=1)
    shapes = {name: tuple(t.shape) for name, t in separate.state_dict().items()}
    assert shapes["k_proj_weight"] == (4, 5) and shapes["v_proj_weight"] == (4, 3)
    assert shapes["q_proj_weight"] == (EMBED_DIM, EMBED_DIM)


def test_default_options_keep_pytorchs_state_dict() -> None:
    """At the defaults, PyTorch's state dict (names and shapes) is unchanged."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS)
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS)
    expected = {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}
    assert {name: tuple(t.shape) for name, t in candidate.state_dict().items()} == expected
    assert candidate.num_kv_heads == NUM_HEADS and candidate.head_dim == EMBED_DIM // NUM_HEADS
    assert candidate.rope_theta is None and candidate.rotary_dim is None
    assert candidate.rotary_interleaved is False


def test_options_are_properties() -> None:
    """The options read back as the Python module's attributes do (rotary_dim as given)."""
    options = {"num_kv_heads": 2, "rope_theta": 500.0, "rotary_dim": 2, "rotary_interleaved": True}
    reference = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **options)
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **options)
    for name in ("num_kv_heads", "rope_theta", "rotary_dim", "rotary_interleaved", "head_dim"):
        assert getattr(candidate, name) == getattr(reference, name), name
        assert getattr(candidate.cpp_module, name) == getattr(reference, name), name
    full = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, rope_theta=10000.0)
    assert full.rotary_dim is None and full.num_kv_heads == NUM_HEADS


def test_new_options_are_keyword_only() -> None:
    """As on the Python module: after batch_first, only by keyword."""
    older_options = (EMBED_DIM, NUM_HEADS, 0.0, True, False, False, None, None, False)
    with pytest.raises(TypeError):
        torchmha.cpp.MultiHeadAttention(*older_options, 2)  # type: ignore[misc]
    with pytest.raises(TypeError):
        torchmha._C.MultiHeadAttention(*older_options, 2)
    assert torchmha._C.MultiHeadAttention(*older_options, num_kv_heads=2).num_kv_heads == 2


# Explicit positions place rotary embeddings, so they go with the configurations that have them;
# self-attention needs keys and values of embed_dim features.
POSITIONED = [
    pytest.param(name, positions, id=f"{name}-{positions}")
    for name, config in CONFIGS.items()
    if "kdim" not in config
    for positions in (["default", "rows"] if "rope_theta" in config else ["default"])
]


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("name, positions", POSITIONED)
def test_self_attention_matches_python_module(
    name: str, positions: str, need_weights: bool
) -> None:
    """Outputs, per-head weights and every input and parameter gradient equal the Python
    module's, with the default positions and with per-row ones, causal."""
    config = CONFIGS[name]
    reference, candidate = make_pair(**config)
    query = self_attention_input(config)
    kwargs: Dict[str, Any] = {
        "need_weights": need_weights,
        "average_attn_weights": False,
        "is_causal": True,
    }
    if positions == "rows":
        kwargs["positions"] = row_positions()
    assert_parity(reference, candidate, (query, query, query), **kwargs)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_cross_attention_and_masks_match_python_module(config: Dict[str, Any]) -> None:
    """Keys longer than queries at the default positions, padding and an attention mask."""
    reference, candidate = make_pair(**config)
    batch_first = config.get("batch_first", False)
    query = sequence_first(BATCH, 4, EMBED_DIM, batch_first, torch.float64)
    key = sequence_first(BATCH, 6, config.get("kdim", EMBED_DIM), batch_first, torch.float64)
    value = sequence_first(BATCH, 6, config.get("vdim", EMBED_DIM), batch_first, torch.float64)
    padding = torch.rand(BATCH, 6) < 0.3
    padding[:, 0] = False
    assert_parity(
        reference,
        candidate,
        (query, key, value),
        key_padding_mask=padding,
        attn_mask=torch.randn(4, 6, dtype=torch.float64),
    )


def test_unbatched_positions_match_python_module() -> None:
    """Unbatched input with (L,) positions."""
    config = CONFIGS["grouped_rotary_partial_interleaved"]
    reference, candidate = make_pair(**config)
    query = self_attention_input(config, unbatched=True)
    positions = torch.arange(LENGTH) * 3 + 1
    assert_parity(reference, candidate, (query, query, query), positions=positions)


def test_positions_change_the_result() -> None:
    """``positions`` reaches the op: spreading the tokens apart changes the weights."""
    _, candidate = make_pair(rope_theta=10000.0)
    query = self_attention_input({})
    _, by_default = candidate(query, query, query)
    _, spread = candidate(query, query, query, positions=torch.arange(LENGTH) * 5)
    assert not torch.allclose(spread, by_default)


BAD_OPTIONS = [
    ({"num_kv_heads": 0}, "`num_kv_heads` must be greater than 0, got 0"),
    ({"num_kv_heads": -1}, "`num_kv_heads` must be greater than 0, got -1"),
    ({"num_kv_heads": 8}, r"`num_kv_heads` \(8\) must be at most `num_heads` \(4\)"),
    ({"num_kv_heads": 3}, r"`num_kv_heads` \(3\) must divide `num_heads` \(4\)"),
    ({"rope_theta": 0.0}, "`rope_theta` must be positive and finite, got 0"),
    ({"rope_theta": -1.5}, "`rope_theta` must be positive and finite, got -1.5"),
    ({"rope_theta": float("inf")}, "`rope_theta` must be positive and finite, got inf"),
    ({"rope_theta": float("nan")}, "`rope_theta` must be positive and finite, got nan"),
    ({"rope_theta": 1e4, "rotary_dim": 3}, "`rotary_dim` must be even.*got 3"),
    ({"rope_theta": 1e4, "rotary_dim": 0}, "`rotary_dim` must be even.*got 0"),
    ({"rope_theta": 1e4, "rotary_dim": 6}, r"`rotary_dim` .*head_dim .* = 4\), got 6"),
    ({"rotary_dim": 2}, "`rotary_dim`=2 needs `rope_theta`"),
    ({"rotary_interleaved": True}, "`rotary_interleaved`=true needs `rope_theta`"),
]


@pytest.mark.parametrize(
    "options, message", BAD_OPTIONS, ids=[str(options) for options, _ in BAD_OPTIONS]
)
def test_bad_options_raise_value_error_naming_them(options: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **options)


def test_repr_shows_the_new_options() -> None:
    candidate = torchmha.cpp.MultiHeadAttention(
        EMBED_DIM, NUM_HEADS, num_kv_heads=2, rope_theta=10000.0, rotary_dim=2
    )
    assert "num_kv_heads=2, rope_theta=10000, rotary_dim=2)" in repr(candidate)


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copies_keep_the_new_options(how: str) -> None:
    """A copy has the options, weights and numbers of the original, rotary and grouped."""
    config = CONFIGS["grouped_rotary_partial_half_bias_kv_zero_attn_batch_first"]
    reference, candidate = make_pair(**config)
    copied = COPIES[how](candidate)
    assert copied.cpp_module is not candidate.cpp_module
    for name in ("num_kv_heads", "rope_theta", "rotary_dim", "rotary_interleaved", "batch_first"):
        assert getattr(copied, name) == getattr(candidate, name), name
    assert repr(copied) == repr(candidate)
    for name, tensor in candidate.state_dict().items():
        assert torch.equal(copied.state_dict()[name], tensor), name
    query = self_attention_input(config)
    assert_parity(reference, copied, (query, query, query), positions=row_positions())


def unpickle_state(state: Tuple[Any, ...]) -> Any:
    """``torchmha._C.MultiHeadAttention`` rebuilt from ``state``, as pickle rebuilds it."""
    module = torchmha._C.MultiHeadAttention.__new__(torchmha._C.MultiHeadAttention)
    module.__setstate__(state)
    return module


def pickled_state(**options: Any) -> Tuple[Any, ...]:
    return torchmha.cpp.MultiHeadAttention(
        EMBED_DIM, NUM_HEADS, **options
    ).cpp_module.__getstate__()


def test_pickle_format_is_new_only_when_the_new_options_are_used() -> None:
    """Format 1 (nn.MultiheadAttention's options, which earlier releases read) at the defaults;
    format 2 with the new options, which earlier releases refuse rather than drop them."""
    plain_format, plain_options, _, _ = pickled_state()
    assert plain_format == 1 and len(plain_options) == 9
    for options in ({"num_kv_heads": 2}, {"rope_theta": 1e4}, {"rope_theta": 1e4, "rotary_dim": 2}):
        new_format, new_options, _, _ = pickled_state(**options)
        assert new_format == 2 and len(new_options) == 13, options


def test_unpickling_a_mismatched_format_is_refused() -> None:
    """Options that do not fit the format's count are refused, never half read."""
    _, options, training, parameters = pickled_state(num_kv_heads=2, rope_theta=1e4)
    assert unpickle_state((2, options, training, parameters)).num_kv_heads == 2
    with pytest.raises(ValueError, match="expected format 1 with 9 options or format 2 with 13"):
        unpickle_state((1, options, training, parameters))
    with pytest.raises(ValueError, match="got format 2 with 9"):
        unpickle_state((2, options[:9], training, parameters))
    with pytest.raises(ValueError, match="got format 3 with 13"):
        unpickle_state((3, options, training, parameters))


def assert_options_survive(options: Optional[Dict[str, Any]] = None) -> None:
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, **(options or {}))
    assert repr(pickled(candidate)) == repr(candidate)


def test_every_new_option_alone_survives_pickling() -> None:
    for options in (
        {"num_kv_heads": 1},
        {"rope_theta": 0.5},
        {"rope_theta": 10000.0, "rotary_dim": 2},
        {"rope_theta": 10000.0, "rotary_interleaved": True},
    ):
        assert_options_survive(options)


def test_state_dict_of_other_key_value_heads_is_refused_by_key() -> None:
    """A full-head state dict does not load into a grouped module: the error names the key and
    both shapes, and the module keeps its weights."""
    candidate = torchmha.cpp.MultiHeadAttention(EMBED_DIM, NUM_HEADS, num_kv_heads=2)
    before = {name: tensor.clone() for name, tensor in candidate.state_dict().items()}
    state = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS).state_dict()
    with pytest.raises(RuntimeError, match=r"in_proj_weight.*\[48, 16\].*\[32, 16\]"):
        candidate.load_state_dict(state)
    for name, tensor in candidate.state_dict().items():
        assert torch.equal(tensor, before[name]), name
