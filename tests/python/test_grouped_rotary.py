"""Grouped-query attention and rotary embeddings in the op, against references nobody here wrote.

The reference projects with ``F.linear``, rotates queries and keys with a rotary formula written
here from its definition (pairs ``(i, i + r/2)`` or ``(2i, 2i + 1)`` of the first ``r``
features, angle ``position * theta^(-2i/r)``), and attends with PyTorch's
``F.scaled_dot_product_attention(..., enable_gqa=True)`` on the projected heads; per-head weights
are the softmax of the scores against PyTorch's ``repeat_interleave`` of the key heads (the
grouping that ``enable_gqa`` documents). Everything is compared in float64 at 1e-12 (absolute)
/ 1e-10 (relative): outputs, weights, and the gradients of every input and weight.
Also: ``gradcheck``/``gradgradcheck`` and ``torch.library.opcheck`` of the op with both
features, and float32/float16/bfloat16 against the float64 truth.
"""

import math
from typing import Any, Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchmha

F64 = torch.float64
EMBED_DIM, NUM_HEADS, HEAD_DIM = 24, 4, 6
BATCH, TARGET_LEN, SOURCE_LEN, KDIM, VDIM = 2, 5, 7, 5, 9
# A small base: with a few positions, the slow frequencies turn by more than rounding noise.
THETA = 100.0
TOLERANCE = {"atol": 1e-12, "rtol": 1e-10}

# (num_kv_heads, rope_theta, rotary_dim, rotary_interleaved)
FEATURES: Dict[str, Tuple[int, Optional[float], Optional[int], bool]] = {
    "gqa": (2, None, None, False),
    "mqa": (1, None, None, False),
    "gqa-rope": (2, THETA, None, False),
    "gqa-rope-partial": (2, THETA, 2, False),
    "mqa-rope-interleaved": (1, THETA, None, True),
    "gqa-rope-partial-interleaved": (2, THETA, 4, True),
    "mha-rope-partial": (4, THETA, 4, False),
}

VARIANTS = [
    "plain",
    "bool-mask-2d",
    "float-mask-2d",
    "bool-mask-3d",
    "float-mask-3d",
    "key-padding-bool",
    "key-padding-float",
    "causal",
    "causal-key-padding",
    "positions-1d",
    "positions-2d",
    "positions-int32-causal",
    "bias-kv",
    "zero-attn",
    "bias-kv-zero-attn-masks",
    "kdim-vdim",
    "sequence-first",
    "unbatched",
]

WEIGHTS_MODES = {"no-weights": (False, True), "averaged": (True, True), "per-head": (True, False)}


# --- the reference -----------------------------------------------------------------------------


def rotary_reference(
    x: Tensor, positions: Tensor, theta: float, rotary_dim: int, interleaved: bool
) -> Tensor:
    """``x`` (N, heads, T, head_dim) rotated at ``positions`` (N, T), from the definition."""
    half = rotary_dim // 2
    inv_freq = theta ** (-2.0 * torch.arange(half, dtype=F64) / rotary_dim)
    angle = positions.to(F64)[:, None, :, None] * inv_freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    first = torch.arange(0, rotary_dim, 2) if interleaved else torch.arange(half)
    second = first + 1 if interleaved else first + half
    x_first, x_second = x[..., first], x[..., second]
    rotated = x.clone()
    rotated[..., first] = x_first * cos - x_second * sin
    rotated[..., second] = x_second * cos + x_first * sin
    return rotated


def additive_mask(
    mask: Optional[Tensor], batch: int, num_heads: int, target: int, source: int, dtype
) -> Tensor:
    """PyTorch's mask conventions (bool True = not allowed, float added) as (N, H, L, S)."""
    result = torch.zeros(batch, num_heads, target, source, dtype=dtype)
    if mask is None:
        return result
    if mask.dim() == 3:
        mask = mask.view(batch, num_heads, target, source)
    if mask.dtype == torch.bool:
        return result.masked_fill(mask, float("-inf"))
    return result + mask


def pad_column(mask: Optional[Tensor]) -> Optional[Tensor]:
    """A mask with one more key column, not masked (for bias_k and add_zero_attn)."""
    if mask is None:
        return None
    return torch.cat([mask, mask.new_zeros(mask.shape[:-1] + (1,))], dim=-1)


def reference_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    weights: Dict[str, Tensor],
    num_kv_heads: int,
    rope: Optional[Tuple[float, int, bool]],
    positions: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    add_zero_attn: bool = False,
    average_attn_weights: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Batch-first ``(output, weights)``: F.linear, the rotary formula, SDPA with enable_gqa."""
    batch, target, embed_dim = query.shape
    source = key.shape[1]
    head_dim = embed_dim // NUM_HEADS
    kv_dim = num_kv_heads * head_dim
    if "in_proj_weight" in weights:
        w_q, w_k, w_v = weights["in_proj_weight"].split([embed_dim, kv_dim, kv_dim])
    else:
        w_q, w_k, w_v = (weights[f"{name}_proj_weight"] for name in "qkv")
    b_q, b_k, b_v = weights["in_proj_bias"].split([embed_dim, kv_dim, kv_dim])

    def heads(x: Tensor, w: Tensor, b: Tensor, count: int) -> Tensor:
        return F.linear(x, w, b).unflatten(-1, (count, head_dim)).transpose(1, 2)

    q = heads(query, w_q, b_q, NUM_HEADS)
    k = heads(key, w_k, b_k, num_kv_heads)
    v = heads(value, w_v, b_v, num_kv_heads)
    if rope is not None:
        theta, rotary_dim, interleaved = rope
        q_positions = positions if positions is not None else torch.arange(target).expand(batch, -1)
        k_positions = positions if positions is not None else torch.arange(source).expand(batch, -1)
        q = rotary_reference(q, q_positions, theta, rotary_dim, interleaved)
        k = rotary_reference(k, k_positions, theta, rotary_dim, interleaved)
    if is_causal and attn_mask is None:
        attn_mask = torch.ones(target, source, dtype=torch.bool).triu(1)
    # Appended keys come after the rotation: they carry no position.
    appended = []
    if "bias_k" in weights:
        appended.append((weights["bias_k"], weights["bias_v"]))
    if add_zero_attn:
        zeros = torch.zeros(1, 1, kv_dim, dtype=query.dtype)
        appended.append((zeros, zeros))
    for extra_k, extra_v in appended:
        k = torch.cat([k, extra_k.view(1, num_kv_heads, 1, head_dim).expand(batch, -1, -1, -1)], 2)
        v = torch.cat([v, extra_v.view(1, num_kv_heads, 1, head_dim).expand(batch, -1, -1, -1)], 2)
        attn_mask, key_padding_mask = pad_column(attn_mask), pad_column(key_padding_mask)
    keys = k.shape[2]
    mask = additive_mask(attn_mask, batch, NUM_HEADS, target, keys, query.dtype)
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]
        if padding.dtype == torch.bool:
            padding = torch.zeros(padding.shape, dtype=query.dtype).masked_fill(padding, -math.inf)
        mask = mask + padding
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    output = F.linear(
        attended.transpose(1, 2).flatten(-2), weights["out_proj_weight"], weights["out_proj_bias"]
    )
    expanded_k = k.repeat_interleave(NUM_HEADS // num_kv_heads, dim=1)
    scores = q @ expanded_k.transpose(-1, -2) / math.sqrt(head_dim) + mask
    probabilities = scores.softmax(-1)
    return output, probabilities.mean(1) if average_attn_weights else probabilities


# --- the cases ---------------------------------------------------------------------------------


def random(*shape: int, dtype=F64) -> Tensor:
    return (torch.randn(shape, dtype=F64) * 0.5).to(dtype)


def make_weights(
    num_kv_heads: int, kdim: Optional[int], vdim: Optional[int], bias_kv: bool
) -> Dict[str, Tensor]:
    kv_dim = num_kv_heads * HEAD_DIM
    weights = {
        "in_proj_bias": random(EMBED_DIM + 2 * kv_dim),
        "out_proj_weight": random(EMBED_DIM, EMBED_DIM),
        "out_proj_bias": random(EMBED_DIM),
    }
    if kdim is None:
        weights["in_proj_weight"] = random(EMBED_DIM + 2 * kv_dim, EMBED_DIM)
    else:
        weights["q_proj_weight"] = random(EMBED_DIM, EMBED_DIM)
        weights["k_proj_weight"] = random(kv_dim, kdim)
        weights["v_proj_weight"] = random(kv_dim, vdim)
    if bias_kv:
        weights["bias_k"] = random(1, 1, kv_dim)
        weights["bias_v"] = random(1, 1, kv_dim)
    return weights


def visible_first_key(mask: Tensor) -> Tensor:
    """No query row fully masked: key 0 stays visible (fully masked rows are tested elsewhere)."""
    mask = mask.clone()
    if mask.dtype == torch.bool:
        mask[..., 0] = False
    else:
        mask[..., 0] = 0.0
    return mask


def random_mask(shape: Tuple[int, ...], kind: str) -> Tensor:
    blocked = torch.rand(shape) < 0.35
    if kind == "bool":
        return visible_first_key(blocked)
    return visible_first_key(random(*shape).masked_fill(blocked, float("-inf")))


def left_padded_positions(batch: int, length: int, dtype=torch.int64) -> Tensor:
    """Positions as a left-padded batch has them: row i starts i tokens late (pads at 0)."""
    rows = [
        torch.cat([torch.zeros(i, dtype=dtype), torch.arange(length - i, dtype=dtype)])
        for i in range(batch)
    ]
    return torch.stack(rows)


class Case:
    """Batch-first inputs, weights and op arguments of one variant, and the reference call."""

    def __init__(
        self,
        features: Tuple[int, Optional[float], Optional[int], bool],
        variant: str,
        need_weights: bool,
        average: bool,
    ) -> None:
        num_kv_heads, theta, rotary_dim, interleaved = features
        self.variant = variant
        self.need_weights, self.average = need_weights, average
        self.num_kv_heads = num_kv_heads
        self.rope = None if theta is None else (theta, rotary_dim or HEAD_DIM, interleaved)
        self.op_options: Dict[str, Any] = {"num_kv_heads": num_kv_heads}
        if theta is not None:
            self.op_options.update(
                rope_theta=theta, rotary_dim=rotary_dim, rotary_interleaved=interleaved
            )
        cross = variant in (
            "plain",
            "kdim-vdim",
            "bool-mask-2d",
            "float-mask-2d",
            "bool-mask-3d",
            "float-mask-3d",
            "key-padding-bool",
            "key-padding-float",
            "bias-kv",
            "zero-attn",
            "bias-kv-zero-attn-masks",
            "sequence-first",
        )
        batch = 1 if variant == "unbatched" else BATCH
        source = SOURCE_LEN if cross else TARGET_LEN
        kdim, vdim = (KDIM, VDIM) if variant == "kdim-vdim" else (None, None)
        self.weights = make_weights(num_kv_heads, kdim, vdim, variant.startswith("bias-kv"))
        self.inputs = {
            "query": random(batch, TARGET_LEN, EMBED_DIM),
            "key": random(batch, source, kdim or EMBED_DIM),
            "value": random(batch, source, vdim or EMBED_DIM),
        }
        self.arguments: Dict[str, Any] = {}
        mask_3d = (batch * NUM_HEADS, TARGET_LEN, source)
        if variant in ("bool-mask-2d", "float-mask-2d"):
            self.arguments["attn_mask"] = random_mask((TARGET_LEN, source), variant.split("-")[0])
        if variant in ("bool-mask-3d", "float-mask-3d"):
            self.arguments["attn_mask"] = random_mask(mask_3d, variant.split("-")[0])
        if variant in ("key-padding-bool", "causal-key-padding", "bias-kv-zero-attn-masks"):
            self.arguments["key_padding_mask"] = random_mask((batch, source), "bool")
        if variant == "key-padding-float":
            self.arguments["key_padding_mask"] = random_mask((batch, source), "float")
        if variant == "bias-kv-zero-attn-masks":
            self.arguments["attn_mask"] = random_mask(mask_3d, "float")
        if variant.startswith("causal") or variant == "positions-int32-causal":
            self.arguments["is_causal"] = True
        rotary = theta is not None
        if variant == "positions-1d" and rotary:
            self.arguments["positions"] = torch.tensor([3, 1, 4, 1, 5])
        if variant == "positions-2d" and rotary:
            self.arguments["positions"] = left_padded_positions(batch, TARGET_LEN) + 2
        if variant == "positions-int32-causal" and rotary:
            self.arguments["positions"] = left_padded_positions(batch, TARGET_LEN, torch.int32)
        self.add_zero_attn = variant in ("zero-attn", "bias-kv-zero-attn-masks")

    def leaves(self) -> Dict[str, Tensor]:
        """Fresh leaf copies of every differentiable tensor."""
        tensors = {**self.inputs, **self.weights}
        return {name: t.detach().clone().requires_grad_(True) for name, t in tensors.items()}

    def run_op(self, leaves: Dict[str, Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """The op, batch-first unless the variant says otherwise; results batch-first."""
        batch_first = self.variant != "sequence-first"
        unbatched = self.variant == "unbatched"

        def layout(x: Tensor) -> Tensor:
            if unbatched:
                return x[0]
            return x if batch_first else x.transpose(0, 1)

        arguments = dict(self.arguments)
        if unbatched and "key_padding_mask" in arguments:
            arguments["key_padding_mask"] = arguments["key_padding_mask"][0]
        if unbatched and "positions" in arguments and arguments["positions"].dim() == 2:
            arguments["positions"] = arguments["positions"][0]
        weight_names = (
            "in_proj_weight",
            "in_proj_bias",
            "q_proj_weight",
            "k_proj_weight",
            "v_proj_weight",
            "out_proj_weight",
            "out_proj_bias",
            "bias_k",
            "bias_v",
        )
        output, weights = torchmha.multi_head_attention(
            layout(leaves["query"]),
            layout(leaves["key"]),
            layout(leaves["value"]),
            NUM_HEADS,
            **{name: leaves.get(name) for name in weight_names},
            add_zero_attn=self.add_zero_attn,
            need_weights=self.need_weights,
            average_attn_weights=self.average,
            batch_first=batch_first,
            **arguments,
            **self.op_options,
        )
        if unbatched:
            output = output[None]
            weights = None if weights is None else weights[None]
        elif not batch_first:
            output = output.transpose(0, 1)
        return output, weights

    def run_reference(self, leaves: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        positions = self.arguments.get("positions")
        if positions is not None and positions.dim() == 1:
            positions = positions.expand(leaves["query"].shape[0], -1)
        weights = {name: t for name, t in leaves.items() if name not in ("query", "key", "value")}
        return reference_attention(
            leaves["query"],
            leaves["key"],
            leaves["value"],
            weights,
            self.num_kv_heads,
            self.rope,
            positions=positions,
            attn_mask=self.arguments.get("attn_mask"),
            key_padding_mask=self.arguments.get("key_padding_mask"),
            is_causal=self.arguments.get("is_causal", False),
            add_zero_attn=self.add_zero_attn,
            average_attn_weights=self.average,
        )


def results(case: Case, run) -> Dict[str, Tensor]:
    """Output, weights and every gradient, for a fixed random cotangent."""
    leaves = case.leaves()
    output, weights = run(leaves)
    generator = torch.Generator().manual_seed(1)
    loss = (output * torch.randn(output.shape, generator=generator, dtype=F64)).sum()
    found = {"output": output.detach()}
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=generator, dtype=F64)).sum()
        found["weights"] = weights.detach()
    loss.backward()
    found.update({f"{name}.grad": t.grad for name, t in leaves.items()})
    return found


@pytest.mark.parametrize("mode", WEIGHTS_MODES, ids=WEIGHTS_MODES.keys())
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
def test_against_sdpa_with_grouped_heads(features, variant: str, mode: str) -> None:
    need_weights, average = WEIGHTS_MODES[mode]
    case = Case(features, variant, need_weights, average)
    ours = results(case, case.run_op)

    def reference(leaves: Dict[str, Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        output, weights = case.run_reference(leaves)
        return output, weights if need_weights else None

    expected = results(case, reference)
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(
            ours[name], tensor, **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_rotary_reference_is_the_definition() -> None:
    """The reference formula itself, checked one pair at a time with plain Python floats."""
    x = random(1, 1, 3, 8)
    positions = torch.tensor([[0, 2, 7]])
    for interleaved in (False, True):
        rotated = rotary_reference(x, positions, THETA, 6, interleaved)
        for t, position in enumerate(positions[0].tolist()):
            for i in range(3):
                a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + 3)
                angle = position * THETA ** (-2 * i / 6)
                xa, xb = x[0, 0, t, a].item(), x[0, 0, t, b].item()
                assert rotated[0, 0, t, a].item() == pytest.approx(
                    xa * math.cos(angle) - xb * math.sin(angle), abs=1e-14
                )
                assert rotated[0, 0, t, b].item() == pytest.approx(
                    xb * math.cos(angle) + xa * math.sin(angle), abs=1e-14
                )
            assert torch.equal(rotated[0, 0, t, 6:], x[0, 0, t, 6:])


# --- gradcheck, gradgradcheck, opcheck ------------------------------------------------------------

SMALL_EMBED, SMALL_HEADS, SMALL_KV_HEADS, SMALL_LEN = 8, 2, 1, 3


def small_case(interleaved: bool, need_weights: bool) -> Tuple[Tuple[Tensor, ...], Dict[str, Any]]:
    """Tensors (all differentiable) and options: 2 heads sharing 1 key/value head of 4
    features, 2 of them rotating, per-row positions, bias_k/bias_v, add_zero_attn, padding."""
    kv_dim = SMALL_KV_HEADS * (SMALL_EMBED // SMALL_HEADS)
    tensors = (
        random(2, SMALL_LEN, SMALL_EMBED),  # query
        random(2, SMALL_LEN, SMALL_EMBED),  # key
        random(2, SMALL_LEN, SMALL_EMBED),  # value
        random(SMALL_EMBED + 2 * kv_dim, SMALL_EMBED),  # in_proj_weight
        random(SMALL_EMBED + 2 * kv_dim),  # in_proj_bias
        random(SMALL_EMBED, SMALL_EMBED),  # out_proj_weight
        random(SMALL_EMBED),  # out_proj_bias
        random(1, 1, kv_dim),  # bias_k
        random(1, 1, kv_dim),  # bias_v
    )
    options = {
        "num_kv_heads": SMALL_KV_HEADS,
        "rope_theta": 10.0,
        "rotary_dim": 2,
        "rotary_interleaved": interleaved,
        "positions": torch.tensor([[0, 1, 2], [0, 0, 1]]),
        "key_padding_mask": torch.tensor([[False, False, False], [True, False, False]]),
        "add_zero_attn": True,
        "need_weights": need_weights,
        "average_attn_weights": False,
        "is_causal": not need_weights,
        "batch_first": True,
    }
    return tuple(t.requires_grad_(True) for t in tensors), options


def small_op(options: Dict[str, Any]):
    def attention(
        query, key, value, in_w, in_b, out_w, out_b, bias_k, bias_v
    ) -> Tuple[Tensor, ...]:
        output, weights = torchmha.multi_head_attention(
            query,
            key,
            value,
            SMALL_HEADS,
            in_proj_weight=in_w,
            in_proj_bias=in_b,
            out_proj_weight=out_w,
            out_proj_bias=out_b,
            bias_k=bias_k,
            bias_v=bias_v,
            **options,
        )
        return (output,) if weights is None else (output, weights)

    return attention


@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["fused", "weights"])
def test_gradcheck(interleaved: bool, need_weights: bool) -> None:
    tensors, options = small_case(interleaved, need_weights)
    assert torch.autograd.gradcheck(small_op(options), tensors)


# Second derivatives, one case per rotary layout (each takes seconds).
GRADGRADCHECK_CASES = {"fused-rotate-half": (False, False), "weights-interleaved": (True, True)}


@pytest.mark.parametrize("case", GRADGRADCHECK_CASES)
def test_gradgradcheck(case: str) -> None:
    tensors, options = small_case(*GRADGRADCHECK_CASES[case])
    # Second derivatives need SDPA's math backend on the CPU (see test_gradcheck.py).
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.autograd.gradgradcheck(small_op(options), tensors)


OPCHECK_CASES = {
    "gqa-rope-positions-weights": (False, True),
    "mqa-interleaved-partial-fused": (True, False),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case: str) -> None:
    interleaved, need_weights = OPCHECK_CASES[case]
    tensors, options = small_case(interleaved, need_weights)
    query, key, value, in_w, in_b, out_w, out_b, bias_k, bias_v = tensors
    args = (
        query,
        key,
        value,
        SMALL_HEADS,
        in_w,
        in_b,
        None,
        None,
        None,
        out_w,
        out_b,
        bias_k,
        bias_v,
    )
    result = torch.library.opcheck(torch.ops.torchmha.multi_head_attention.default, args, options)
    assert set(result.values()) == {"SUCCESS"}, result


# --- lower precisions against the float64 truth --------------------------------------------------

LOW_PRECISION_FLOOR = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("features", ["gqa-rope", "gqa-rope-partial-interleaved"])
def test_lower_precision_against_float64(dtype: torch.dtype, features: str) -> None:
    """float32 within float32's tolerance of the float64 truth; float16/bfloat16 no further from
    it than twice the reference computed in the same dtype (+ a small floor)."""
    case = Case(FEATURES[features], "positions-2d", need_weights=False, average=True)
    case.arguments["is_causal"] = True
    rounded = {name: t.to(dtype).to(F64) for name, t in case.leaves().items()}
    case.inputs = {name: rounded[name] for name in case.inputs}
    case.weights = {name: rounded[name] for name in case.weights}
    truth, _ = case.run_reference(case.leaves())
    low = {name: t.detach().to(dtype) for name, t in rounded.items()}
    ours, _ = case.run_op(low)
    if dtype == torch.float32:
        torch.testing.assert_close(ours.double(), truth.detach(), atol=1e-5, rtol=1e-4)
        return
    reference, _ = case.run_reference(low)
    our_error = (ours.double() - truth).abs().max().item()
    reference_error = (reference.double() - truth).abs().max().item()
    assert our_error <= 2 * reference_error + LOW_PRECISION_FLOOR[dtype], (
        our_error,
        reference_error,
    )
