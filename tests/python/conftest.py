"""Shared fixtures and helpers: paired modules with identical weights, per-dtype tolerances."""

import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

import torchmha

# Per-dtype tolerances against PyTorch. The largest gaps over the suite (reduction order only)
# are 3e-14 (float64) and 4e-6 (float32) absolute: under 1% and 20% of these tolerances.
TOLERANCES: Dict[torch.dtype, Dict[str, float]] = {
    torch.float64: {"atol": 1e-12, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
}


def pytest_configure(config: pytest.Config) -> None:
    """One intra-op thread, here and in every subprocess a test starts (they inherit
    ``OMP_NUM_THREADS``): the tensors are tiny, and idle OpenMP threads spinning on a busy machine
    made the suite several times slower. Tests that are about threads set their own count."""
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """Each floating dtype the op is compared in."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Seed every test so that random inputs and weights are reproducible."""
    torch.manual_seed(0)


def assert_close(actual: Optional[Tensor], expected: Optional[Tensor], **overrides: Any) -> None:
    """``torch.testing.assert_close`` with the tolerance of ``expected``'s dtype."""
    assert actual is not None and expected is not None
    tolerance = dict(TOLERANCES[expected.dtype], **overrides)
    torch.testing.assert_close(actual, expected, **tolerance)


def randomize_parameters(module: nn.Module) -> None:
    """Fill every parameter with random values; the default zero biases would hide bias bugs."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.5)


def make_mha_pair(
    embed_dim: int = 8,
    num_heads: int = 2,
    dtype: torch.dtype = torch.float64,
    **kwargs: Any,
) -> Tuple[nn.MultiheadAttention, torchmha.MultiHeadAttention]:
    """A random ``nn.MultiheadAttention`` and a ``torchmha.MultiHeadAttention`` loaded from it."""
    reference = nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **kwargs)
    randomize_parameters(reference)
    candidate = torchmha.MultiHeadAttention(embed_dim, num_heads, dtype=dtype, **kwargs)
    candidate.load_state_dict(reference.state_dict(), strict=True)
    return reference, candidate


def sequence_first(
    batch: int, length: int, features: int, batch_first: bool, dtype: torch.dtype
) -> Tensor:
    """A random input in ``(N, L, E)`` layout when ``batch_first``, else ``(L, N, E)``."""
    shape = (batch, length, features) if batch_first else (length, batch, features)
    return torch.randn(shape, dtype=dtype)


def leaf(tensor: Tensor) -> Tensor:
    """A detached copy that records gradients, so both modules get their own input leaves."""
    return tensor.detach().clone().requires_grad_(True)


def grads_by_name(module: nn.Module) -> Dict[str, Optional[Tensor]]:
    """Every parameter's gradient, keyed by its state-dict name."""
    return {name: parameter.grad for name, parameter in module.named_parameters()}


def fresh_leaves(tensors: Sequence[Tensor]) -> List[Tensor]:
    """New gradient leaves for ``tensors``, keeping which of them are one and the same tensor."""
    copies: Dict[int, Tensor] = {}
    for tensor in tensors:
        if id(tensor) not in copies:
            copies[id(tensor)] = leaf(tensor)
    return [copies[id(tensor)] for tensor in tensors]


def forward_backward(
    module: nn.Module,
    inputs: Sequence[Tensor],
    cotangents: Tuple[Tensor, Optional[Tensor]],
    **forward_kwargs: Any,
) -> Tuple[Tensor, Optional[Tensor], List[Optional[Tensor]], Dict[str, Optional[Tensor]]]:
    """Run ``module`` on fresh leaves of ``inputs``, backprop ``cotangents``; return all results."""
    module.zero_grad(set_to_none=True)
    leaves = fresh_leaves(inputs)
    output, weights = module(*leaves, **forward_kwargs)
    # A random cotangent per output checks every gradient entry, not only their sum.
    loss = (output * cotangents[0]).sum()
    if cotangents[1] is not None:
        assert weights is not None
        loss = loss + (weights * cotangents[1]).sum()
    loss.backward()
    return output, weights, [tensor.grad for tensor in leaves], grads_by_name(module)


def assert_parity(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Sequence[Tensor],
    **forward_kwargs: Any,
) -> None:
    """Outputs, weights, input gradients and parameter gradients of both modules agree."""
    with torch.no_grad():
        expected_output, expected_weights = reference(*inputs, **forward_kwargs)
    cotangents = (
        torch.randn_like(expected_output),
        None if expected_weights is None else torch.randn_like(expected_weights),
    )
    expected = forward_backward(reference, inputs, cotangents, **forward_kwargs)
    actual = forward_backward(candidate, inputs, cotangents, **forward_kwargs)

    assert_close(actual[0], expected[0])
    if forward_kwargs.get("need_weights", True):
        assert_close(actual[1], expected[1])
    else:
        assert actual[1] is None and expected[1] is None
    for actual_grad, expected_grad in zip(actual[2], expected[2]):
        assert_close(actual_grad, expected_grad)
    assert actual[3].keys() == expected[3].keys()
    for name, expected_grad in expected[3].items():
        assert expected_grad is not None, name
        assert_close(actual[3][name], expected_grad, msg=lambda message, n=name: f"{n}: {message}")


def random_bool_masks(
    batch: int, target_len: int, source_len: int, groups: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Key padding ``(N, S)``, ``(L, S)`` and ``(groups, L, S)`` masks, True = masked.

    One key stays visible in all of them, so no query row is fully masked even when combined.
    """
    key_padding = torch.rand(batch, source_len) < 0.3
    attn_2d = torch.rand(target_len, source_len) < 0.3
    attn_3d = torch.rand(groups, target_len, source_len) < 0.3
    visible = int(torch.randint(source_len, ()))
    for mask in (key_padding, attn_2d, attn_3d):
        mask[..., visible] = False
    return key_padding, attn_2d, attn_3d


# The models of the interchange fixtures (tests/fixtures) serve the Python interchange tests too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))


# The two torchmha modules that stand in for torch.nn.MultiheadAttention.
IMPLS = ["python", "cpp"]

# Tests parametrized by device also run on CUDA where a GPU is present (skipped, and said so,
# where not).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    ),
]

# Low precision is judged against PyTorch in the same dtype (as in test_cuda.py): torchmha's
# error to a float64 result may be at most twice PyTorch's own, plus this floor for when
# PyTorch's error happens to be tiny (about one unit in the last place at magnitude 1-10).
LOW_PRECISION_FLOOR: Dict[torch.dtype, float] = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def make_impl_pair(
    impl: str,
    embed_dim: int = 8,
    num_heads: int = 2,
    dtype: torch.dtype = torch.float64,
    **kwargs: Any,
) -> Tuple[nn.MultiheadAttention, nn.Module]:
    """A random ``nn.MultiheadAttention`` and, loaded from it, ``torchmha.MultiHeadAttention``
    (``impl="python"``) or the pybind11-bound ``torchmha.cpp.MultiHeadAttention`` (``"cpp"``)."""
    if impl == "python":
        return make_mha_pair(embed_dim, num_heads, dtype, **kwargs)
    reference = nn.MultiheadAttention(embed_dim, num_heads, dtype=dtype, **kwargs)
    randomize_parameters(reference)
    candidate = torchmha.cpp.MultiHeadAttention(embed_dim, num_heads, **kwargs)
    # Made by C++ on the CPU; moved to the reference's device (the default device's).
    candidate = candidate.to(device=reference.out_proj.weight.device, dtype=dtype)
    candidate.load_state_dict(reference.state_dict(), strict=True)
    return reference, candidate


def assert_no_worse_than_pytorch(
    ours: Tensor, pytorch: Tensor, truth: Tensor, floor: float, name: str = "result"
) -> None:
    """``max|ours - truth| <= 2 * max|pytorch - truth| + floor``, all compared in float64."""
    our_error = (ours.double() - truth).abs().max().item()
    pytorch_error = (pytorch.double() - truth).abs().max().item()
    assert our_error <= 2 * pytorch_error + floor, (
        f"{name}: torchmha is {our_error:.3e} from float64, PyTorch {pytorch_error:.3e}"
    )
