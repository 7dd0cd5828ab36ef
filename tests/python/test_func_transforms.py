"""``torch.func`` through ``torch.func.functional_call`` on every path of the op.

``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``vmap``, per-sample gradients (``vmap`` of ``grad``)
and ``torch.autograd.forward_ad`` of ``torchmha.MultiHeadAttention`` must equal those of
``torch.nn.MultiheadAttention`` in float64: with ``need_weights`` False and True (averaged and per
head), with and without masks, wherever PyTorch's module works. functorch wraps tensors in
wrappers of its own and supports no C++ autograd Function, and forward-mode AD has no formula for
out= ops, so there the op composes plain ATen ops; the CPU's blocked ``need_weights`` path (an
autograd Function, taken once the scores outgrow its blocks) is reached with small inputs in a
subprocess that shrinks the blocks (``TORCHMHA_SCORE_BLOCK_BYTES``, as
``test_blocked_gradcheck.py`` does). Under vmap the op runs once on the batched tensors, so that
vmap's ``randomness`` modes hold for dropout.
"""

import os
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from conftest import DEVICES, LOW_PRECISION_FLOOR, assert_close, assert_no_worse_than_pytorch
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacfwd, jacrev, vjp, vmap

import torchmha

F64 = torch.float64
BATCH, TARGET_LEN, SOURCE_LEN, EMBED_DIM, NUM_HEADS = 2, 7, 5, 4, 2
SAMPLES = 3  # the leading dimension vmap maps over

PATHS: Dict[str, Dict[str, Any]] = {
    "fused": {"need_weights": False},
    "weights_averaged": {"need_weights": True, "average_attn_weights": True},
    "weights_per_head": {"need_weights": True, "average_attn_weights": False},
}
MASKS = ["none", "bool", "float"]
TRANSFORMS = ["grad", "vjp", "jacrev", "jacfwd", "vmap", "per_sample_grad", "forward_ad"]
FORWARD_MODE = {"jacfwd", "forward_ad"}
# Where PyTorch's module works: its need_weights=False path has no forward-mode AD on the CPU
# (SDPA's kernel lacks one), so forward mode is compared on the weights paths only.
CASES = [
    (path, transform)
    for path in PATHS
    for transform in TRANSFORMS
    if PATHS[path]["need_weights"] or transform not in FORWARD_MODE
]
# Blocks of 96 bytes hold two float64 query rows of one head's scores over five keys.
SHRUNK_BLOCK_BYTES = "96"
# The weights paths with the blocks shrunk, each with a mask (the in-process tests take all).
BLOCKED_CASES = [("weights_averaged", "bool"), ("weights_per_head", "float")]


def make_masks(kind: str, generator: torch.Generator) -> Dict[str, Tensor]:
    """Padding and attention masks that leave every query row at least one key (key 0)."""
    if kind == "none":
        return {}
    attn = torch.rand(TARGET_LEN, SOURCE_LEN, generator=generator) < 0.3
    attn[:, 0] = False
    if kind == "float":
        scores = torch.randn(BATCH * NUM_HEADS, TARGET_LEN, SOURCE_LEN, generator=generator)
        return {"attn_mask": scores.to(F64).masked_fill(attn, float("-inf"))}
    padding = torch.rand(BATCH, SOURCE_LEN, generator=generator) < 0.3
    padding[:, 0] = False
    return {"key_padding_mask": padding, "attn_mask": attn}


def make_pair(
    dtype: torch.dtype = F64, device: str = "cpu", rounded_to: Optional[torch.dtype] = None
) -> Tuple[nn.Module, nn.Module]:
    """PyTorch's module (in training mode, no dropout: never its fast path) and torchmha's, with
    the same random weights, rounded to ``rounded_to`` (default ``dtype``) and held in ``dtype``."""
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, batch_first=True, dtype=F64)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_((torch.randn_like(parameter) * 0.5).to(rounded_to or dtype))
    ours = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, batch_first=True, dtype=F64)
    ours.load_state_dict(reference.state_dict())
    return reference.to(device, dtype).train(), ours.to(device, dtype).train()


def transform_results(
    transform: str,
    module: nn.Module,
    forward_kwargs: Dict[str, Any],
    query: Tensor,
    memory: Tensor,
    cotangents: Tuple[Tensor, ...],
) -> Any:
    """What ``transform`` gives for ``module`` called through functional_call on its parameters."""
    params = {name: p.detach() for name, p in module.named_parameters()}

    def forward(p: Dict[str, Tensor], q: Tensor, m: Tensor) -> Tuple[Tensor, ...]:
        output, weights = functional_call(module, p, (q, m, m), forward_kwargs)
        return (output,) if weights is None else (output, weights)

    def loss(p: Dict[str, Tensor], q: Tensor, m: Tensor) -> Tensor:
        # A random cotangent per result checks every gradient entry, not only their sum.
        results = forward(p, q, m)
        return sum((r * c).sum() for r, c in zip(results, cotangents))

    if transform == "grad":
        return grad(loss, argnums=(0, 1, 2))(params, query, memory)
    if transform == "vjp":
        primals, pullback = vjp(forward, params, query, memory)
        return primals, pullback(cotangents[: len(primals)])
    if transform == "jacrev":
        return jacrev(forward, argnums=(1, 2))(params, query, memory)
    if transform == "jacfwd":
        return jacfwd(forward, argnums=(1, 2))(params, query, memory)
    if transform == "forward_ad":
        # torch.autograd.forward_ad itself, outside torch.func, on parameters that need no grad.
        with forward_ad.dual_level():
            duals = (
                forward_ad.make_dual(query, cotangents[0]),
                forward_ad.make_dual(memory, memory.cos()),
            )
            return [tuple(forward_ad.unpack_dual(r)) for r in forward(params, *duals)]
    queries = torch.stack([query * (1 + i) for i in range(SAMPLES)])
    memories = torch.stack([memory - i for i in range(SAMPLES)])
    if transform == "vmap":
        return vmap(forward, in_dims=(None, 0, 0))(params, queries, memories)
    assert transform == "per_sample_grad", transform
    return vmap(grad(loss), in_dims=(None, 0, 0))(params, queries, memories)


def transform_leaves(
    transform: str,
    path: str,
    mask_kind: str,
    implementation: str,
    dtype: torch.dtype = F64,
    device: str = "cpu",
    rounded_to: Optional[torch.dtype] = None,
) -> List[Tensor]:
    """The flattened result of ``transform`` for PyTorch's module (``implementation="pytorch"``)
    or torchmha's, computed in ``dtype`` on weights, inputs and cotangents drawn in float64 and
    rounded to ``rounded_to`` (default ``dtype``)."""
    modules = make_pair(dtype, device, rounded_to)
    module = modules[0] if implementation == "pytorch" else modules[1]
    generator = torch.Generator().manual_seed(1)
    weights_shape = (BATCH,) + ((NUM_HEADS,) if path == "weights_per_head" else ())
    drawn = [
        torch.randn(BATCH, TARGET_LEN, EMBED_DIM, generator=generator, dtype=F64),
        torch.randn(BATCH, SOURCE_LEN, EMBED_DIM, generator=generator, dtype=F64),
        torch.randn(BATCH, TARGET_LEN, EMBED_DIM, generator=generator, dtype=F64),
        torch.randn(*weights_shape, TARGET_LEN, SOURCE_LEN, generator=generator, dtype=F64),
    ]
    query, memory, *cotangents = [t.to(rounded_to or dtype).to(device, dtype) for t in drawn]
    masks = {
        name: mask if mask.dtype == torch.bool else mask.to(rounded_to or dtype).to(dtype)
        for name, mask in make_masks(mask_kind, generator).items()
    }
    forward_kwargs = {**PATHS[path], **{name: m.to(device) for name, m in masks.items()}}
    result = transform_results(transform, module, forward_kwargs, query, memory, tuple(cotangents))
    return torch.utils._pytree.tree_leaves(result)


def check_transform(transform: str, path: str, mask_kind: str) -> None:
    """torchmha's result under ``transform`` equals PyTorch's in float64, tensor by tensor."""
    expected = transform_leaves(transform, path, mask_kind, "pytorch")
    actual = transform_leaves(transform, path, mask_kind, "torchmha")
    assert len(actual) == len(expected)
    for actual_leaf, expected_leaf in zip(actual, expected):
        assert_close(actual_leaf, expected_leaf)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("path, transform", CASES)
def test_transform_equals_pytorch(path: str, transform: str, mask_kind: str) -> None:
    """Scores far below the CPU's blocks: the fused and the unblocked weights paths."""
    check_transform(transform, path, mask_kind)


def test_transforms_on_the_blocked_path_equal_pytorch() -> None:
    """Every transform on both weights paths with the CPU's blocks shrunk to two rows, so that
    the same small inputs would take the blocked path (checked there without a transform)."""
    environment = {**os.environ, "TORCHMHA_SCORE_BLOCK_BYTES": SHRUNK_BLOCK_BYTES}
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "blocked path taken" in result.stdout, result.stdout
    checked = int(result.stdout.split("transforms checked: ")[1].split()[0])
    assert checked == len(BLOCKED_CASES) * len(TRANSFORMS), result.stdout


@pytest.mark.parametrize("path", PATHS)
def test_vmap_dropout_follows_randomness_as_pytorch(path: str) -> None:
    """With dropout, vmap's ``randomness`` holds as for PyTorch's module: "error" refuses the
    random op, "same" drops the same entries in every sample, "different" different ones."""
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, dropout=0.5, batch_first=True)
    ours = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, dropout=0.5, batch_first=True)
    ours.load_state_dict(reference.state_dict())
    sample = torch.randn(BATCH, TARGET_LEN, EMBED_DIM)
    identical_samples = sample.expand(SAMPLES, -1, -1, -1)
    for module in (reference.train(), ours.train()):
        params = {name: p.detach() for name, p in module.named_parameters()}

        def forward(x: Tensor, module: nn.Module = module, params: Dict = params) -> Tensor:
            output, weights = functional_call(module, params, (x, x, x), PATHS[path])
            return output if weights is None else weights

        with pytest.raises(RuntimeError, match="randomness"):
            vmap(forward, randomness="error")(identical_samples)
        same = vmap(forward, randomness="same")(identical_samples)
        assert all(torch.equal(same[0], same[i]) for i in range(1, SAMPLES)), type(module)
        different = vmap(forward, randomness="different")(identical_samples)
        assert not torch.equal(different[0], different[1]), type(module)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "jacfwd", "vmap", "forward_ad"])
def test_head_mean_softmax_op_under_transforms(transform: str) -> None:
    """The op behind averaged weights on devices with a kernel of their own; on the CPU its
    autograd formula is the one every device shares. Compared with softmax(...).mean(1)."""
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(BATCH, NUM_HEADS, TARGET_LEN, SOURCE_LEN, generator=generator, dtype=F64)
    cotangent = torch.randn(BATCH, TARGET_LEN, SOURCE_LEN, generator=generator, dtype=F64)

    def results(function: Callable[[Tensor], Tensor]) -> Any:
        if transform == "grad":
            return grad(lambda s: (function(s) * cotangent).sum())(scores)
        if transform == "vjp":
            primal, pullback = vjp(function, scores)
            return primal, pullback(cotangent)
        if transform == "jacrev":
            return jacrev(function)(scores)
        if transform == "jacfwd":
            return jacfwd(function)(scores)
        if transform == "forward_ad":
            with forward_ad.dual_level():
                return tuple(
                    forward_ad.unpack_dual(
                        function(
                            forward_ad.make_dual(scores, cotangent.unsqueeze(1).expand_as(scores))
                        )
                    )
                )
        return vmap(function)(torch.stack([scores, 2 * scores]))

    expected = results(lambda s: s.softmax(-1).mean(1))
    actual = results(torch.ops.torchmha._head_mean_softmax)
    for actual_leaf, expected_leaf in zip(
        torch.utils._pytree.tree_leaves(actual), torch.utils._pytree.tree_leaves(expected)
    ):
        assert_close(actual_leaf, expected_leaf)


@pytest.mark.parametrize("transform", ["grad", "vmap", "per_sample_grad"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", [d for d in DEVICES if "cuda" in str(d)])
def test_low_precision_transform_no_worse_than_pytorch(
    device: str, dtype: torch.dtype, path: str, transform: str
) -> None:
    """On CUDA in half precision, averaged weights come from a kernel of torchmha's own
    (csrc/cuda): judged against PyTorch's module in float64 on the same rounded numbers,
    torchmha's error stays within twice PyTorch's own in the same dtype."""
    args = (transform, path, "bool")
    truth = transform_leaves(*args, "pytorch", F64, device, rounded_to=dtype)
    expected = transform_leaves(*args, "pytorch", dtype, device)
    actual = transform_leaves(*args, "torchmha", dtype, device)
    assert len(actual) == len(expected) == len(truth)
    for i, (ours, theirs, exact) in enumerate(zip(actual, expected, truth)):
        floor = LOW_PRECISION_FLOOR[dtype] * max(exact.abs().max().item(), 1.0)
        assert_no_worse_than_pytorch(ours, theirs, exact.double(), floor, f"result {i}")


def _check_blocked_path() -> None:
    """Run with TORCHMHA_SCORE_BLOCK_BYTES shrunk: every transform on BLOCKED_CASES."""
    _, ours = make_pair()
    query = torch.randn(BATCH, TARGET_LEN, EMBED_DIM, dtype=F64, requires_grad=True)
    memory = torch.randn(BATCH, SOURCE_LEN, EMBED_DIM, dtype=F64)
    _, weights = ours(query, memory, memory)
    # Without a transform, the weights come straight from the blocked path's autograd Function.
    assert "BlockedAttention" in weights.grad_fn.name(), weights.grad_fn.name()
    print("blocked path taken")
    checked = 0
    for path, mask_kind in BLOCKED_CASES:
        for transform in TRANSFORMS:
            check_transform(transform, path, mask_kind)
            checked += 1
    print(f"transforms checked: {checked}")


if __name__ == "__main__":
    _check_blocked_path()
