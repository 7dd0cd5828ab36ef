"""``torch.autocast`` on every path, against ``torch.nn.MultiheadAttention`` under autocast too.

Under autocast the op's projections run in the autocast dtype, while masks, appended
``bias_k``/``bias_v`` and the parameters stay float32; every path must then give PyTorch's result
dtypes, and values as close to the truth as PyTorch's: the truth is PyTorch's module in float64 on
the same weights and inputs, and torchmha's largest error to it may be at most twice PyTorch's own
under the same autocast, plus ``conftest.LOW_PRECISION_FLOOR`` (as in ``test_low_precision.py``).
Paths: ``need_weights`` False and True (averaged and per head), with and without masks, inference
and training (input and parameter gradients), bfloat16 and float16, and on the CPU scores below
and beyond the 8 MiB from which ``need_weights=True`` is computed in blocks.
"""

import copy
from contextlib import nullcontext
from typing import Any, Dict, Optional, Tuple

import pytest
import torch
from conftest import DEVICES, LOW_PRECISION_FLOOR, assert_no_worse_than_pytorch
from torch import Tensor, nn

import torchmha

F64 = torch.float64
EMBED_DIM, NUM_HEADS = 8, 2
SMALL = (2, 5, 7)  # batch, target and source length
# 2 * 2 * 1100 * 1024 scores: 8.6 MiB in a 16-bit dtype, beyond the CPU blocks' 8 MiB.
LARGE = (2, 1100, 1024)
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]

PATHS: Dict[str, Dict[str, Any]] = {
    "fused": {"need_weights": False},
    "weights_averaged": {"need_weights": True, "average_attn_weights": True},
    "weights_per_head": {"need_weights": True, "average_attn_weights": False},
}
MASKS = ["none", "bool", "float"]


def make_masks(kind: str, batch: int, target_len: int, source_len: int) -> Dict[str, Tensor]:
    """Float32 or bool masks that leave every query row its first key."""
    generator = torch.Generator().manual_seed(1)
    if kind == "none":
        return {}
    attn = torch.rand(target_len, source_len, generator=generator) < 0.3
    attn[:, 0] = False
    if kind == "float":
        shape = (batch * NUM_HEADS, target_len, source_len)
        scores = torch.randn(shape, generator=generator)
        return {"attn_mask": scores.masked_fill(attn, float("-inf"))}
    padding = torch.rand(batch, source_len, generator=generator) < 0.3
    padding[:, 0] = False
    return {"key_padding_mask": padding, "attn_mask": attn}


def fixed_cotangent(tensor: Tensor) -> Tensor:
    """Distinct float64 values in [-1, 1], the same for every module and dtype."""
    values = torch.linspace(-1, 1, tensor.numel(), dtype=F64, device=tensor.device)
    return values.view(tensor.shape)


def run(
    module: nn.Module,
    inputs: Dict[str, Tensor],
    forward_kwargs: Dict[str, Any],
    autocast_dtype: Optional[torch.dtype],
    training: bool,
) -> Tuple[Dict[str, Tensor], str]:
    """Output, weights and, in training, the gradients of the inputs and every parameter; and the
    name of the function that made the weights (empty without autograd)."""
    device = inputs["query"].device.type
    module.zero_grad(set_to_none=True)
    query = inputs["query"].clone().requires_grad_(training)
    memory = inputs["memory"].clone().requires_grad_(training)
    context = torch.autocast(device, autocast_dtype) if autocast_dtype else nullcontext()
    with context, torch.set_grad_enabled(training):
        output, weights = module(query, memory, memory, **forward_kwargs)
    found = {"output": output}
    if weights is not None:
        found["weights"] = weights
    made_by = weights.grad_fn.name() if weights is not None and weights.grad_fn else ""
    if training:
        # A cotangent of distinct values per result, so that every gradient entry matters.
        loss = sum(
            (tensor.double() * fixed_cotangent(tensor)).sum()
            for tensor in (output, weights)
            if tensor is not None
        )
        loss.backward()
        found.update(query_grad=query.grad, memory_grad=memory.grad)
        found.update({f"{name}.grad": p.grad for name, p in module.named_parameters()})
    return found, made_by


def check_autocast(
    device: str,
    autocast_dtype: torch.dtype,
    path: str,
    mask_kind: str,
    training: bool,
    sizes: tuple = SMALL,
    **module_kwargs: Any,
) -> str:
    """Every result has PyTorch's dtype and is no further from the float64 truth than twice
    PyTorch's under the same autocast; returns the name of what made torchmha's weights."""
    torch.manual_seed(0)
    pytorch = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, batch_first=True, **module_kwargs)
    with torch.no_grad():
        for parameter in pytorch.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)
    ours = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, batch_first=True, **module_kwargs)
    ours.load_state_dict(pytorch.state_dict())
    truth_module = copy.deepcopy(pytorch).double()
    batch, target_len, source_len = sizes
    inputs = {
        "query": torch.randn(batch, target_len, EMBED_DIM),
        "memory": torch.randn(batch, source_len, EMBED_DIM),
    }
    forward_kwargs = {**PATHS[path], **make_masks(mask_kind, batch, target_len, source_len)}

    def on(target_device: str, dtype: Optional[torch.dtype] = None):
        def moved(tensor: Tensor) -> Tensor:
            floating = dtype is not None and tensor.is_floating_point()
            return tensor.to(target_device, dtype if floating else tensor.dtype)

        return {k: moved(t) for k, t in inputs.items()}, {
            k: moved(v) if isinstance(v, Tensor) else v for k, v in forward_kwargs.items()
        }

    modules = (pytorch.to(device).train(), ours.to(device).train(), truth_module.to(device))
    expected, _ = run(modules[0], *on(device), autocast_dtype, training)
    actual, made_by = run(modules[1], *on(device), autocast_dtype, training)
    truth, _ = run(modules[2], *on(device, F64), None, training)
    assert actual.keys() == expected.keys() == truth.keys()
    for name, exact in truth.items():
        assert actual[name].dtype == expected[name].dtype, name
        floor = LOW_PRECISION_FLOOR[autocast_dtype] * max(exact.abs().max().item(), 1.0)
        assert_no_worse_than_pytorch(actual[name], expected[name], exact, floor, name)
    return made_by


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_matches_pytorch(
    device: str, autocast_dtype: torch.dtype, path: str, mask_kind: str, training: bool
) -> None:
    """Small scores: the fused path and, on the CPU, the unblocked weights path."""
    check_autocast(device, autocast_dtype, path, mask_kind, training)


@pytest.mark.parametrize("autocast_dtype", AUTOCAST_DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_with_appended_keys_matches_pytorch(device: str, autocast_dtype: torch.dtype):
    """float32 ``bias_k``/``bias_v`` appended to keys and values of the autocast dtype."""
    check_autocast(
        device, autocast_dtype, "weights_per_head", "bool", True, add_bias_kv=True,
        add_zero_attn=True,
    )  # fmt: skip


# Each dtype with both weights paths, in inference and in training, and both mask kinds (the
# appended keys' case below has none); large scores make these the file's slow cases.
BLOCKED_CASES = [
    (torch.bfloat16, "weights_averaged", "bool", True),
    (torch.bfloat16, "weights_per_head", "float", False),
    (torch.float16, "weights_per_head", "bool", True),
    (torch.float16, "weights_averaged", "float", False),
]


@pytest.mark.parametrize("autocast_dtype, path, mask_kind, training", BLOCKED_CASES, ids=str)
def test_autocast_on_cpu_blocks_matches_pytorch(
    autocast_dtype: torch.dtype, path: str, mask_kind: str, training: bool
) -> None:
    """Scores beyond the CPU blocks' threshold in the autocast dtype: the blocked path."""
    made_by = check_autocast("cpu", autocast_dtype, path, mask_kind, training, LARGE)
    if training:
        assert "BlockedAttention" in made_by, "the blocked path was not taken"


def test_autocast_on_cpu_blocks_with_appended_keys_matches_pytorch() -> None:
    """The blocked path with float32 ``bias_k``/``bias_v`` appended to bfloat16 keys, no mask."""
    check_autocast(
        "cpu", torch.bfloat16, "weights_per_head", "none", False, LARGE, add_bias_kv=True,
        add_zero_attn=True,
    )  # fmt: skip
