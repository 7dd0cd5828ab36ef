"""Every call ``torch.nn.MultiheadAttention`` rejects, both torchmha modules reject too.

``BAD_CALLS`` is a table of bad calls (constructor arguments and forward arguments). Each is run
on PyTorch's module, which must raise (PyTorch mostly raises ``AssertionError``), and on
``torchmha.MultiHeadAttention`` and ``torchmha.cpp.MultiHeadAttention``, which must raise
``RuntimeError``/``ValueError`` with a message that names the argument (as ```name```) and, where
a shape is at fault, shows that shape. The documented improvement (``is_causal=True`` without a
mask) is listed separately: PyTorch raises, torchmha computes causal attention. Calls PyTorch
rejects but torchmha accepts are strict xfails with the reason, to be fixed or documented.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
from conftest import IMPLS
from torch import Tensor, nn

import torchmha

EMBED_DIM, NUM_HEADS, BATCH, TARGET_LEN, SOURCE_LEN, KDIM, VDIM = 8, 2, 3, 4, 5, 5, 6

FACTORIES: Dict[str, Callable[..., nn.Module]] = {
    "pytorch": nn.MultiheadAttention,
    "python": torchmha.MultiHeadAttention,
    "cpp": torchmha.cpp.MultiHeadAttention,
}


def seq(
    length: int, features: int, batch: int = BATCH, dtype: torch.dtype = torch.float32
) -> Tensor:
    """A sequence-first input ``(L, N, F)``."""
    return torch.randn(length, batch, features, dtype=dtype)


def q() -> Tensor:
    """The well-formed batched query ``(L, N, E)``."""
    return seq(TARGET_LEN, EMBED_DIM)


def kv() -> Tensor:
    """A well-formed batched key/value ``(S, N, E)``."""
    return seq(SOURCE_LEN, EMBED_DIM)


@dataclass
class BadCall:
    """A call to reject: ``module(*inputs(), **kwargs)`` on ``factory(*args, **options)``."""

    name: str
    inputs: Callable[[], Tuple[Tensor, ...]]
    fragments: Tuple[str, ...]  # What torchmha's message must contain.
    kwargs: Callable[[], Dict[str, Any]] = dict
    args: Tuple[int, int] = (EMBED_DIM, NUM_HEADS)
    options: Dict[str, Any] = field(default_factory=dict)
    xfail: str = ""

    def call(self, factory: Callable[..., nn.Module]) -> Any:
        """Build the module (training mode, as constructed) and run the call."""
        module = factory(*self.args, **self.options)
        return module(*self.inputs(), **self.kwargs())


SEPARATE = {"kdim": KDIM, "vdim": VDIM}


def unbatched(length: int, features: int = EMBED_DIM) -> Tensor:
    """An unbatched input ``(L, F)``."""
    return torch.randn(length, features)


BAD_CALLS: List[BadCall] = [
    # Ranks.
    BadCall("query_1d", lambda: (torch.randn(8),) * 3, ("`query`", "[8]")),
    BadCall(
        "query_4d", lambda: (torch.randn(TARGET_LEN, BATCH, 1, 8),) * 3, ("`query`", "[4, 3, 1, 8]")
    ),
    BadCall("key_2d_for_3d_query", lambda: (q(), unbatched(5), kv()), ("`key`", "[5, 8]")),
    BadCall("value_2d_for_3d_query", lambda: (q(), kv(), unbatched(5)), ("`value`", "[5, 8]")),
    BadCall(
        "key_3d_for_2d_query", lambda: (unbatched(4), kv(), unbatched(5)), ("`key`", "[5, 3, 8]")
    ),
    # embed_dim, kdim/vdim and the shapes of key and value.
    BadCall(
        "query_embed_dim",
        lambda: (seq(4, 6), seq(5, 6), seq(5, 6)),
        ("`query`", "embed_dim 8", "[4, 3, 6]"),
    ),
    BadCall(
        "key_dim_with_packed_weight", lambda: (q(), seq(5, 6), seq(5, 6)), ("`key`", "[5, 3, 6]")
    ),
    BadCall(
        "value_dim_with_packed_weight", lambda: (q(), kv(), seq(5, 6)), ("`value`", "[5, 3, 6]")
    ),
    BadCall("key_value_lengths", lambda: (q(), kv(), seq(6, 8)), ("`value`", "[6, 3, 8]")),
    BadCall(
        "key_value_batch",
        lambda: (q(), seq(5, 8, batch=2), seq(5, 8, batch=2)),
        ("`key`", "[5, 2, 8]"),
    ),
    BadCall(
        "value_batch_with_separate_weights",
        lambda: (q(), seq(5, KDIM), seq(5, VDIM, batch=2)),
        ("`value`", "[5, 2, 6]"),
        options=SEPARATE,
    ),
    BadCall(
        "key_value_lengths_with_separate_weights",
        lambda: (q(), seq(5, KDIM), seq(6, VDIM)),
        ("`value`", "[6, 3, 6]"),
        options=SEPARATE,
    ),
    BadCall(
        "key_dim_not_kdim",
        lambda: (q(), seq(5, 4), seq(5, VDIM)),
        ("`k_proj_weight`", "key.size(-1)", "[8, 4]"),
        options=SEPARATE,
    ),
    BadCall(
        "value_dim_not_vdim",
        lambda: (q(), seq(5, KDIM), seq(5, 7)),
        ("`v_proj_weight`", "value.size(-1)", "[8, 7]"),
        options=SEPARATE,
    ),
    # Dtypes of the inputs.
    BadCall(
        "integer_query",
        lambda: (torch.ones(4, 3, 8, dtype=torch.long),) * 3,
        ("`query`", "Long"),
    ),
    BadCall(
        "query_dtype_not_the_modules",
        lambda: (seq(4, 8, dtype=torch.float64),) * 3,
        ("`query`", "Double"),
    ),
    BadCall(
        "key_dtype_not_the_querys",
        lambda: (q(), seq(5, 8, dtype=torch.float64), kv()),
        ("`key`", "Double"),
    ),
    # key_padding_mask shapes and dtypes.
    BadCall(
        "key_padding_mask_length",
        lambda: (q(), kv(), kv()),
        ("`key_padding_mask`", "[3, 4]"),
        kwargs=lambda: {"key_padding_mask": torch.zeros(3, 4, dtype=torch.bool)},
    ),
    BadCall(
        "key_padding_mask_batch",
        lambda: (q(), kv(), kv()),
        ("`key_padding_mask`", "[2, 5]"),
        kwargs=lambda: {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)},
    ),
    BadCall(
        "key_padding_mask_1d_for_batched",
        lambda: (q(), kv(), kv()),
        ("`key_padding_mask`", "[5]"),
        kwargs=lambda: {"key_padding_mask": torch.zeros(5, dtype=torch.bool)},
    ),
    BadCall(
        "key_padding_mask_3d",
        lambda: (q(), kv(), kv()),
        ("`key_padding_mask`", "[3, 1, 5]"),
        kwargs=lambda: {"key_padding_mask": torch.zeros(3, 1, 5, dtype=torch.bool)},
    ),
    BadCall(
        "key_padding_mask_unbatched_length",
        lambda: (unbatched(4), unbatched(5), unbatched(5)),
        ("`key_padding_mask`", "[4]"),
        kwargs=lambda: {"key_padding_mask": torch.zeros(4, dtype=torch.bool)},
    ),
    BadCall(
        "key_padding_mask_2d_for_unbatched",
        lambda: (unbatched(4), unbatched(5), unbatched(5)),
        ("`key_padding_mask`", "[1, 5]"),
        kwargs=lambda: {"key_padding_mask": torch.zeros(1, 5, dtype=torch.bool)},
    ),
    BadCall(
        "key_padding_mask_int64",
        lambda: (q(), kv(), kv()),
        ("`key_padding_mask`", "Long"),
        kwargs=lambda: {"key_padding_mask": torch.zeros(3, 5, dtype=torch.long)},
    ),
    BadCall(
        "key_padding_mask_uint8",
        lambda: (q(), kv(), kv()),
        ("`key_padding_mask`", "Byte"),
        kwargs=lambda: {"key_padding_mask": torch.zeros(3, 5, dtype=torch.uint8)},
    ),
    # attn_mask shapes and dtypes.
    BadCall(
        "attn_mask_2d_shape",
        lambda: (q(), kv(), kv()),
        ("`attn_mask`", "[4, 4]"),
        kwargs=lambda: {"attn_mask": torch.zeros(4, 4, dtype=torch.bool)},
    ),
    BadCall(
        "attn_mask_3d_groups",
        lambda: (q(), kv(), kv()),
        ("`attn_mask`", "[3, 4, 5]"),
        kwargs=lambda: {"attn_mask": torch.zeros(3, 4, 5, dtype=torch.bool)},
    ),
    BadCall(
        "attn_mask_3d_length",
        lambda: (q(), kv(), kv()),
        ("`attn_mask`", "[6, 4, 4]"),
        kwargs=lambda: {"attn_mask": torch.zeros(6, 4, 4, dtype=torch.bool)},
    ),
    BadCall(
        "attn_mask_3d_unbatched_groups",
        lambda: (unbatched(4), unbatched(5), unbatched(5)),
        ("`attn_mask`", "[6, 4, 5]"),
        kwargs=lambda: {"attn_mask": torch.zeros(6, 4, 5, dtype=torch.bool)},
    ),
    BadCall(
        "attn_mask_2d_unbatched_shape",
        lambda: (unbatched(4), unbatched(5), unbatched(5)),
        ("`attn_mask`", "[5, 4]"),
        kwargs=lambda: {"attn_mask": torch.zeros(5, 4, dtype=torch.bool)},
    ),
    BadCall(
        "attn_mask_4d",
        lambda: (q(), kv(), kv()),
        ("`attn_mask`", "[3, 2, 4, 5]"),
        kwargs=lambda: {"attn_mask": torch.zeros(3, 2, 4, 5, dtype=torch.bool)},
    ),
    BadCall(
        "attn_mask_1d",
        lambda: (q(), kv(), kv()),
        ("`attn_mask`", "[5]"),
        kwargs=lambda: {"attn_mask": torch.zeros(5, dtype=torch.bool)},
    ),
    BadCall(
        "attn_mask_int64",
        lambda: (q(), kv(), kv()),
        ("`attn_mask`", "Long"),
        kwargs=lambda: {"attn_mask": torch.zeros(4, 5, dtype=torch.long)},
    ),
    BadCall(
        "attn_mask_uint8",
        lambda: (q(), kv(), kv()),
        ("`attn_mask`", "Byte"),
        kwargs=lambda: {"attn_mask": torch.zeros(4, 5, dtype=torch.uint8)},
    ),
    # Constructor arguments.
    BadCall(
        "embed_dim_not_divisible", lambda: (q(),) * 3, ("embed_dim 6", "num_heads 4"), args=(6, 4)
    ),
    BadCall("num_heads_zero", lambda: (q(),) * 3, ("num_heads=0",), args=(8, 0)),
    BadCall("num_heads_negative", lambda: (q(),) * 3, ("num_heads=-2",), args=(8, -2)),
    BadCall("embed_dim_zero", lambda: (q(),) * 3, ("embed_dim=0",), args=(0, 2)),
    BadCall("embed_dim_negative", lambda: (q(),) * 3, ("embed_dim=-8",), args=(-8, 2)),
    # PyTorch accepts these at construction and refuses them in the training forward.
    BadCall("dropout_above_one", lambda: (q(),) * 3, ("dropout", "1.5"), options={"dropout": 1.5}),
    # PyTorch's softmax path skips a negative dropout silently; its SDPA path refuses it.
    BadCall(
        "dropout_negative",
        lambda: (q(),) * 3,
        ("dropout", "-0.5"),
        kwargs=lambda: {"need_weights": False},
        options={"dropout": -0.5},
    ),
]


def bad_call_params() -> List[Any]:
    """The table as pytest params; calls torchmha wrongly accepts are strict xfails."""
    params = []
    for bad in BAD_CALLS:
        for impl in IMPLS:
            marks = [pytest.mark.xfail(strict=True, reason=bad.xfail)] if bad.xfail else []
            params.append(pytest.param(bad, impl, id=f"{bad.name}-{impl}", marks=marks))
    return params


@pytest.mark.parametrize("bad", BAD_CALLS, ids=[bad.name for bad in BAD_CALLS])
def test_pytorch_rejects(bad: BadCall) -> None:
    """The table holds only calls that ``torch.nn.MultiheadAttention`` rejects."""
    with pytest.raises(Exception):  # noqa: B017 - PyTorch raises AssertionError/RuntimeError/...
        bad.call(FACTORIES["pytorch"])


@pytest.mark.parametrize(("bad", "impl"), bad_call_params())
def test_torchmha_rejects_naming_the_argument(bad: BadCall, impl: str) -> None:
    """torchmha rejects the call too, naming the argument and the offending shape or dtype."""
    with pytest.raises((RuntimeError, ValueError)) as raised:
        bad.call(FACTORIES[impl])
    message = str(raised.value)
    for fragment in bad.fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_without_mask_is_the_documented_improvement(
    impl: str, need_weights: bool
) -> None:
    """PyTorch refuses ``is_causal=True`` without ``attn_mask``; torchmha computes causal
    attention instead (its values are checked against PyTorch in test_matrix.py)."""
    query = q()
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        FACTORIES["pytorch"](EMBED_DIM, NUM_HEADS)(query, query, query, is_causal=True)
    output, _ = FACTORIES[impl](EMBED_DIM, NUM_HEADS)(
        query, query, query, is_causal=True, need_weights=need_weights
    )
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_mask_ignored_by_pytorchs_causal_hint_is_still_checked(impl: str) -> None:
    """Stricter than PyTorch (reported): with ``is_causal=True``, ``need_weights=False`` and no
    padding mask, PyTorch drops ``attn_mask`` without checking its shape (so a misshapen mask
    passes); torchmha still validates it and refuses."""
    query = q()
    misshapen = torch.zeros(2, 2, dtype=torch.bool)
    kwargs = {"attn_mask": misshapen, "is_causal": True, "need_weights": False}
    FACTORIES["pytorch"](EMBED_DIM, NUM_HEADS)(query, query, query, **kwargs)
    with pytest.raises(RuntimeError, match="`attn_mask`"):
        FACTORIES[impl](EMBED_DIM, NUM_HEADS)(query, query, query, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_name", ["attn_mask", "key_padding_mask"])
def test_float_mask_of_another_dtype_is_converted(impl: str, mask_name: str) -> None:
    """Documented improvement: PyTorch rejects a float64 mask for float32 inputs when it computes
    weights and accepts it when it does not; torchmha converts it to the inputs' dtype on both
    paths, which gives what PyTorch gives for the converted mask."""
    query = q()
    shape = (4, 4) if mask_name == "attn_mask" else (3, 4)
    mask = torch.zeros(shape, dtype=torch.float64)
    mask[..., 1] = float("-inf")
    reference = FACTORIES["pytorch"](EMBED_DIM, NUM_HEADS).eval()
    with pytest.raises(RuntimeError):
        reference(query, query, query, need_weights=True, **{mask_name: mask})
    candidate = FACTORIES[impl](EMBED_DIM, NUM_HEADS).eval()
    candidate.load_state_dict(reference.state_dict())
    for need_weights in (True, False):
        output, _ = candidate(query, query, query, need_weights=need_weights, **{mask_name: mask})
        expected, _ = reference(query, query, query, **{mask_name: mask.float()})
        torch.testing.assert_close(output, expected)
