"""Property and fuzz tests with hypothesis.

Random valid configurations (shapes, kdim/vdim, biases, masks, flags, dtypes, dropout) give
``torch.nn.MultiheadAttention``'s outputs, weights and gradients; random invalid ones raise an
error that names the argument, and never crash.

CI runs a fixed (derandomized) set of examples. A longer, random run is one command:
``scripts/fuzz.sh [examples]`` (it sets ``TORCHMHA_FUZZ_EXAMPLES``).
"""

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import pytest
import torch
from conftest import TOLERANCES
from grouped_rotary_reference import GroupedRotaryAttention
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import torchmha

FUZZ_EXAMPLES = int(os.environ.get("TORCHMHA_FUZZ_EXAMPLES", "0"))
FUZZ_SETTINGS = settings(
    max_examples=FUZZ_EXAMPLES or 100,
    # CI draws the same examples every run; the long run explores new ones.
    derandomize=not FUZZ_EXAMPLES,
    database=None,
    deadline=None,
    # The autouse seed fixture runs once per test; every example seeds its own generators.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

MASK_KINDS = ["none", "bool", "float"]
ATTN_MASK_KINDS = ["none", "bool_2d", "bool_3d", "float_2d", "float_3d", "causal"]


@dataclass(frozen=True)
class Config:
    """One valid call: module options, input shapes, masks and flags."""

    num_heads: int
    head_dim: int
    kdim: Optional[int]
    vdim: Optional[int]
    bias: bool
    add_bias_kv: bool
    add_zero_attn: bool
    batch_first: bool
    batch: Optional[int]  # None: unbatched 2-D inputs
    target_len: int
    source_len: int
    self_attention: bool
    key_is_value: bool
    dtype: torch.dtype
    need_weights: bool
    average_attn_weights: bool
    key_padding_mask: str
    attn_mask: str
    dropout: float
    training: bool
    seed: int
    # Beyond torch.nn.MultiheadAttention (grouped_rotary_configs draws them).
    num_kv_heads: Optional[int] = None
    rope_theta: Optional[float] = None
    rotary_dim: Optional[int] = None
    rotary_interleaved: bool = False
    given_positions: bool = False

    @property
    def grouped_rotary_kwargs(self) -> Dict[str, Any]:
        return {
            "num_kv_heads": self.num_kv_heads,
            "rope_theta": self.rope_theta,
            "rotary_dim": self.rotary_dim,
            "rotary_interleaved": self.rotary_interleaved,
        }

    @property
    def embed_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def module_kwargs(self) -> Dict[str, Any]:
        return {
            "dropout": self.dropout,
            "bias": self.bias,
            "add_bias_kv": self.add_bias_kv,
            "add_zero_attn": self.add_zero_attn,
            "kdim": self.kdim,
            "vdim": self.vdim,
            "batch_first": self.batch_first,
            "dtype": self.dtype,
        }


@st.composite
def valid_configs(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Config:
    num_heads = draw(st.integers(1, 4))
    head_dim = draw(st.integers(1, 4))
    kdim = draw(st.one_of(st.none(), st.integers(1, 6)))
    vdim = draw(st.one_of(st.none(), st.integers(1, 6)))
    same_features = kdim in (None, num_heads * head_dim) and vdim in (None, num_heads * head_dim)
    self_attention = same_features and draw(st.booleans())
    target_len = draw(st.integers(1, 5))
    dropout = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    return Config(
        num_heads=num_heads,
        head_dim=head_dim,
        kdim=kdim,
        vdim=vdim,
        bias=draw(st.booleans()),
        add_bias_kv=draw(st.booleans()),
        add_zero_attn=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        batch=draw(st.one_of(st.none(), st.integers(1, 3))),
        target_len=target_len,
        source_len=target_len if self_attention else draw(st.integers(1, 5)),
        self_attention=self_attention,
        key_is_value=self_attention or (kdim == vdim and draw(st.booleans())),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        need_weights=draw(st.booleans()),
        average_attn_weights=draw(st.booleans()),
        key_padding_mask=draw(st.sampled_from(MASK_KINDS)),
        attn_mask=draw(st.sampled_from(ATTN_MASK_KINDS)),
        dropout=dropout,
        training=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def grouped_rotary_configs(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Config:
    """A valid config with grouped key/value heads and rotary embeddings drawn on top."""
    config = draw(valid_configs())
    heads, head_dim = config.num_heads, config.head_dim
    num_kv_heads = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    rotary = head_dim % 2 == 0 and draw(st.booleans())
    rotary_dims = [None, *range(2, head_dim + 1, 2)]
    return dataclasses.replace(
        config,
        num_kv_heads=draw(st.sampled_from([None, num_kv_heads])),
        rope_theta=draw(st.sampled_from([10000.0, 10.0, 1e6])) if rotary else None,
        rotary_dim=draw(st.sampled_from(rotary_dims)) if rotary else None,
        rotary_interleaved=rotary and draw(st.booleans()),
        given_positions=rotary and config.self_attention and draw(st.booleans()),
    )


class Inputs:
    """Tensors for a config, drawn from a generator seeded by it (never the global one)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        embed_dim = config.embed_dim
        self.query = self.sequence(config.target_len, embed_dim)
        if config.self_attention:
            self.key = self.value = self.query
        else:
            self.key = self.sequence(config.source_len, config.kdim or embed_dim)
            same = config.key_is_value
            self.value = (
                self.key if same else self.sequence(config.source_len, config.vdim or embed_dim)
            )
        self.masks = {
            "key_padding_mask": self.key_padding_mask(),
            "attn_mask": self.attn_mask(),
            "is_causal": config.attn_mask == "causal",
        }
        if config.given_positions:
            # Each batch entry from its own offset, as a left-padded batch has them.
            rows = () if config.batch is None else (config.batch,)
            offsets = torch.randint(0, 1000, (*rows, 1), generator=self.generator)
            self.masks["positions"] = (offsets + torch.arange(config.target_len)).reshape(
                *rows, config.target_len
            )

    def randn(self, *shape: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        return torch.randn(shape, generator=self.generator, dtype=dtype or self.config.dtype)

    def sequence(self, length: int, features: int) -> Tensor:
        config = self.config
        if config.batch is None:
            return self.randn(length, features)
        if config.batch_first:
            return self.randn(config.batch, length, features)
        return self.randn(length, config.batch, features)

    def random_mask(self, shape: Tuple[int, ...], kind: str) -> Tensor:
        """Masked where True (bool) or -inf (float); key 0 stays visible, so no query row is
        fully masked (where torchmha deliberately differs from PyTorch)."""
        masked = torch.rand(shape, generator=self.generator) < 0.3
        masked[..., 0] = False
        if kind.startswith("bool"):
            return masked
        return self.randn(*shape).masked_fill(masked, -math.inf)

    def key_padding_mask(self) -> Optional[Tensor]:
        config = self.config
        if config.key_padding_mask == "none":
            return None
        shape = (config.source_len,) if config.batch is None else (config.batch, config.source_len)
        return self.random_mask(shape, config.key_padding_mask)

    def attn_mask(self) -> Optional[Tensor]:
        config = self.config
        lengths = (config.target_len, config.source_len)
        if config.attn_mask == "none":
            return None
        if config.attn_mask == "causal":
            # With the mask given, torchmha and PyTorch treat is_causal the same way.
            return torch.ones(lengths, dtype=torch.bool).triu(1)
        groups = (config.batch or 1) * config.num_heads
        shape = lengths if config.attn_mask.endswith("2d") else (groups, *lengths)
        return self.random_mask(shape, config.attn_mask)

    def leaves(self) -> List[Tensor]:
        """Fresh gradient leaves for query, key and value, keeping which are one tensor."""
        copies: Dict[int, Tensor] = {}
        for tensor in (self.query, self.key, self.value):
            copies.setdefault(id(tensor), tensor.detach().clone().requires_grad_())
        return [copies[id(tensor)] for tensor in (self.query, self.key, self.value)]


def make_modules(config: Config) -> Tuple[nn.MultiheadAttention, torchmha.MultiHeadAttention]:
    generator = torch.Generator().manual_seed(config.seed + 1)
    reference = nn.MultiheadAttention(config.embed_dim, config.num_heads, **config.module_kwargs)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    candidate = torchmha.MultiHeadAttention(
        config.embed_dim, config.num_heads, **config.module_kwargs
    )
    candidate.load_state_dict(reference.state_dict())
    return reference.train(config.training), candidate.train(config.training)


def run(module: nn.Module, inputs: Inputs) -> Dict[str, Optional[Tensor]]:
    """Forward with the config's flags (dropout seeded the same for both modules) and backward
    of fixed random cotangents; returns outputs and every gradient by name."""
    config = inputs.config
    module.zero_grad(set_to_none=True)
    leaves = inputs.leaves()
    torch.manual_seed(config.seed)
    output, weights = module(
        *leaves,
        need_weights=config.need_weights,
        average_attn_weights=config.average_attn_weights,
        **inputs.masks,
    )
    cotangents = torch.Generator().manual_seed(config.seed + 2)
    loss = (output * torch.randn(output.shape, generator=cotangents, dtype=output.dtype)).sum()
    if weights is not None:
        loss = (
            loss
            + (
                weights * torch.randn(weights.shape, generator=cotangents, dtype=weights.dtype)
            ).sum()
        )
    loss.backward()
    results: Dict[str, Optional[Tensor]] = {"output": output, "weights": weights}
    results.update({f"grad {n}": leaf.grad for n, leaf in zip(("query", "key", "value"), leaves)})
    results.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    return results


def assert_same_results(
    actual: Dict[str, Optional[Tensor]], expected: Dict[str, Optional[Tensor]], dtype: torch.dtype
) -> None:
    """The same outputs and gradients by name, at the dtype's tolerance."""
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        assert (got is None) == (want is None), name
        if want is not None:
            torch.testing.assert_close(
                got, want, **TOLERANCES[dtype], msg=lambda m, n=name: f"{n}: {m}"
            )


# PyTorch's own warning for a float padding mask with a bool attn_mask, which both accept.
@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@FUZZ_SETTINGS
@given(config=valid_configs())
def test_random_valid_configs_match_pytorch(config: Config) -> None:
    """Outputs, weights and all gradients equal ``torch.nn.MultiheadAttention``'s, dropout
    included (both draw the same mask from the same seed)."""
    inputs = Inputs(config)
    reference, candidate = make_modules(config)
    expected = run(reference, inputs)
    actual = run(candidate, inputs)
    assert_same_results(actual, expected, config.dtype)


def make_grouped_rotary_modules(config: Config, impl: str) -> Tuple[nn.Module, nn.Module]:
    """GroupedRotaryAttention with random weights, and torchmha's module (``impl``) loaded
    from it."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    options = dict(config.module_kwargs, **config.grouped_rotary_kwargs)
    reference = GroupedRotaryAttention(config.embed_dim, config.num_heads, **options)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    candidate: nn.Module
    if impl == "python":
        candidate = torchmha.MultiHeadAttention(config.embed_dim, config.num_heads, **options)
    else:
        dtype = options.pop("dtype")
        candidate = torchmha.cpp.MultiHeadAttention(config.embed_dim, config.num_heads, **options)
        candidate = candidate.to(dtype)
    candidate.load_state_dict(reference.state_dict())
    return reference.train(config.training), candidate.train(config.training)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("impl", ["python", "cpp"])
@FUZZ_SETTINGS
@given(config=grouped_rotary_configs())
def test_random_grouped_rotary_configs_match_reference(config: Config, impl: str) -> None:
    """With grouped heads and rotary embeddings drawn too: outputs, weights and all gradients
    equal GroupedRotaryAttention's (PyTorch's multi_head_attention_forward after test-side
    projection, rotation and repetition), dropout included."""
    inputs = Inputs(config)
    reference, candidate = make_grouped_rotary_modules(config, impl)
    expected = run(reference, inputs)
    actual = run(candidate, inputs)
    assert_same_results(actual, expected, config.dtype)


@dataclass(frozen=True)
class Mutation:
    """One way to make a valid call invalid, and the error it must give."""

    error: Type[Exception]
    names: str  # regex: the argument(s) the message must name
    apply: Callable[[Dict[str, Any], Config], None]


def extra_feature(tensor: Tensor) -> Tensor:
    return torch.cat([tensor, tensor[..., :1]], dim=-1)


def set_(
    name: str, make: Callable[[Dict[str, Any], Config], Any]
) -> Callable[[Dict[str, Any], Config], None]:
    def apply(arguments: Dict[str, Any], config: Config) -> None:
        arguments[name] = make(arguments, config)

    return apply


def first_weight(arguments: Dict[str, Any]) -> str:
    return "in_proj_weight" if arguments["in_proj_weight"] is not None else "q_proj_weight"


MUTATIONS: Dict[str, Mutation] = {
    "query_rank": Mutation(
        RuntimeError,
        "`query`",
        set_("query", lambda a, c: a["query"].reshape(-1) if c.batch is None else a["query"][None]),
    ),
    "key_rank": Mutation(RuntimeError, "`key`", set_("key", lambda a, c: a["key"][None])),
    "query_embed_dim": Mutation(
        RuntimeError, "`query`", set_("query", lambda a, c: extra_feature(a["query"]))
    ),
    "key_features": Mutation(
        RuntimeError,
        "`(in_proj_weight|k_proj_weight)`",
        set_("key", lambda a, c: extra_feature(a["key"])),
    ),
    "value_features": Mutation(
        RuntimeError,
        "`(in_proj_weight|v_proj_weight)`",
        set_("value", lambda a, c: extra_feature(a["value"])),
    ),
    "heads_not_dividing": Mutation(
        ValueError, "num_heads", set_("num_heads", lambda a, c: c.embed_dim + 1)
    ),
    "heads_not_positive": Mutation(
        ValueError, "`num_heads`", set_("num_heads", lambda a, c: -c.num_heads + 1)
    ),
    "out_proj_not_square": Mutation(
        RuntimeError,
        "`out_proj_weight`",
        set_("out_proj_weight", lambda a, c: extra_feature(a["out_proj_weight"])),
    ),
    "projection_weight_shape": Mutation(
        RuntimeError,
        "`(in_proj_weight|q_proj_weight)`",
        lambda a, c: a.update({first_weight(a): a[first_weight(a)][1:]}),
    ),
    "integer_attn_mask": Mutation(
        RuntimeError,
        "`attn_mask`",
        set_("attn_mask", lambda a, c: torch.zeros(c.target_len, c.source_len, dtype=torch.int32)),
    ),
    "attn_mask_4d": Mutation(
        RuntimeError,
        "`attn_mask`",
        set_(
            "attn_mask",
            lambda a, c: torch.zeros(1, 1, c.target_len, c.source_len, dtype=torch.bool),
        ),
    ),
    "attn_mask_length": Mutation(
        RuntimeError,
        "`attn_mask`",
        set_(
            "attn_mask", lambda a, c: torch.zeros(c.target_len, c.source_len + 1, dtype=torch.bool)
        ),
    ),
    "key_padding_mask_length": Mutation(
        RuntimeError,
        "`key_padding_mask`",
        set_(
            "key_padding_mask",
            lambda a, c: torch.zeros(
                *([c.batch] if c.batch else []), c.source_len + 1, dtype=torch.bool
            ),
        ),
    ),
    "integer_key_padding_mask": Mutation(
        RuntimeError,
        "`key_padding_mask`",
        set_(
            "key_padding_mask",
            lambda a, c: torch.zeros(
                *([c.batch] if c.batch else []), c.source_len, dtype=torch.int64
            ),
        ),
    ),
    "key_of_other_dtype": Mutation(
        RuntimeError,
        "`key`",
        set_(
            "key",
            lambda a, c: a["key"].to(torch.float64 if c.dtype == torch.float32 else torch.float32),
        ),
    ),
    "value_on_meta": Mutation(
        RuntimeError, "`value`", set_("value", lambda a, c: a["value"].to("meta"))
    ),
    "weight_on_meta": Mutation(
        RuntimeError,
        "`out_proj_weight`",
        set_("out_proj_weight", lambda a, c: a["out_proj_weight"].to("meta")),
    ),
    "dropout_outside_0_1": Mutation(
        ValueError,
        "`dropout_p`",
        set_("dropout_p", lambda a, c: [-0.1, 1.5, math.nan, math.inf][c.seed % 4]),
    ),
}


def op_arguments(config: Config, module: Optional[nn.Module] = None) -> Dict[str, Any]:
    """The keyword arguments of ``torchmha.multi_head_attention`` for a valid config, with the
    weights of ``module`` (by default the torchmha module of ``make_modules``)."""
    inputs = Inputs(config)
    if module is None:
        _, module = make_modules(config)
    return {
        "query": inputs.query,
        "key": inputs.key,
        "value": inputs.value,
        "num_heads": config.num_heads,
        "in_proj_weight": module.in_proj_weight,
        "in_proj_bias": module.in_proj_bias,
        "out_proj_weight": module.out_proj.weight,
        "out_proj_bias": module.out_proj.bias,
        "q_proj_weight": module.q_proj_weight,
        "k_proj_weight": module.k_proj_weight,
        "v_proj_weight": module.v_proj_weight,
        "bias_k": module.bias_k,
        "bias_v": module.bias_v,
        "add_zero_attn": config.add_zero_attn,
        "dropout_p": config.dropout,
        "training": config.training,
        "need_weights": config.need_weights,
        "average_attn_weights": config.average_attn_weights,
        "batch_first": config.batch_first,
        **config.grouped_rotary_kwargs,
        **inputs.masks,
    }


def check_refused(arguments: Dict[str, Any], rule: Mutation, mutation: str, config: Config) -> None:
    """A valid call made invalid by ``rule`` raises the rule's type, naming the argument."""
    assert torchmha.multi_head_attention(**arguments)[0].isfinite().all()  # valid before
    rule.apply(arguments, config)
    try:
        torchmha.multi_head_attention(**arguments)
    except (RuntimeError, ValueError) as error:
        message = str(error)
        assert type(error) is rule.error, message
        assert message.startswith("torchmha.multi_head_attention: "), message
        assert re.search(rule.names, message), message
    else:
        raise AssertionError(f"{mutation} was accepted")


@FUZZ_SETTINGS
@given(config=valid_configs(), mutation=st.sampled_from(sorted(MUTATIONS)))
def test_random_invalid_configs_raise_a_clear_error(config: Config, mutation: str) -> None:
    """One invalid argument in an otherwise valid call: the documented exception type, the op's
    name and the argument's name in the message."""
    check_refused(op_arguments(config), MUTATIONS[mutation], mutation, config)


def grouped_rotary_op_arguments(config: Config) -> Dict[str, Any]:
    """The op's keyword arguments for a valid grouped/rotary config."""
    return op_arguments(config, make_grouped_rotary_modules(config, "python")[1])


def positions_like(config: Config, dtype: torch.dtype = torch.int64) -> Tensor:
    rows = () if config.batch is None else (config.batch,)
    return torch.zeros(*rows, config.target_len, dtype=dtype)


GROUPED_ROTARY_MUTATIONS: Dict[str, Mutation] = {
    "kv_heads_not_dividing": Mutation(
        ValueError, "`num_kv_heads`", set_("num_kv_heads", lambda a, c: c.num_heads + 1)
    ),
    "kv_heads_not_positive": Mutation(
        ValueError, "`num_kv_heads`", set_("num_kv_heads", lambda a, c: -(c.seed % 2))
    ),
    "rope_theta_not_positive_or_finite": Mutation(
        ValueError,
        "`rope_theta`",
        set_("rope_theta", lambda a, c: [0.0, -1.0, math.nan, math.inf][c.seed % 4]),
    ),
    "rotary_dim_odd_or_out_of_range": Mutation(
        ValueError,
        "`rotary_dim`",
        lambda a, c: a.update(
            rope_theta=a["rope_theta"] or 10000.0,
            rotary_dim=[1, 0, -2, c.head_dim + 2 - c.head_dim % 2][c.seed % 4],
        ),
    ),
    "rotary_option_without_rope_theta": Mutation(
        ValueError,
        "`(rotary_dim|rotary_interleaved)`",
        lambda a, c: a.update(rope_theta=None, rotary_dim=None, rotary_interleaved=True),
    ),
}

POSITIONS_MUTATIONS: Dict[str, Mutation] = {
    "positions_floating": Mutation(
        RuntimeError,
        "`positions`",
        set_("positions", lambda a, c: positions_like(c, torch.float32)),
    ),
    "positions_too_long": Mutation(
        RuntimeError,
        "`positions`",
        set_("positions", lambda a, c: torch.zeros(c.target_len + 1, dtype=torch.int64)),
    ),
    "positions_on_meta": Mutation(
        RuntimeError, "`positions`", set_("positions", lambda a, c: positions_like(c).to("meta"))
    ),
    "positions_negative": Mutation(
        RuntimeError, "`positions`", set_("positions", lambda a, c: positions_like(c) - 1)
    ),
}


@FUZZ_SETTINGS
@given(config=grouped_rotary_configs(), mutation=st.sampled_from(sorted(GROUPED_ROTARY_MUTATIONS)))
def test_random_invalid_grouped_rotary_options_raise_a_clear_error(
    config: Config, mutation: str
) -> None:
    """An invalid num_kv_heads, rope_theta or rotary_dim in an otherwise valid call: a
    ValueError naming it."""
    check_refused(
        grouped_rotary_op_arguments(config), GROUPED_ROTARY_MUTATIONS[mutation], mutation, config
    )


@st.composite
def rotary_self_attention_configs(draw: Callable[[st.SearchStrategy[Any]], Any]) -> Config:
    """A grouped/rotary config made self-attention with rotary embeddings (an even head_dim),
    where `positions` apply; built, not filtered, so every draw is usable."""
    config = draw(grouped_rotary_configs())
    head_dim = config.head_dim + config.head_dim % 2
    rotary_dim = config.rotary_dim if config.rotary_dim and config.rotary_dim <= head_dim else None
    return dataclasses.replace(
        config,
        head_dim=head_dim,
        kdim=None,
        vdim=None,
        self_attention=True,
        key_is_value=True,
        source_len=config.target_len,
        rope_theta=config.rope_theta or 10000.0,
        rotary_dim=rotary_dim,
    )


@FUZZ_SETTINGS
@given(
    config=rotary_self_attention_configs(),
    mutation=st.sampled_from(sorted(POSITIONS_MUTATIONS)),
)
def test_random_invalid_positions_raise_a_clear_error(config: Config, mutation: str) -> None:
    """Positions of the wrong shape, dtype or device, or negative: a RuntimeError naming
    `positions`."""
    check_refused(
        grouped_rotary_op_arguments(config), POSITIONS_MUTATIONS[mutation], mutation, config
    )
