"""``torch.ops.torchmha._head_mean_softmax``, the kernel op behind CUDA's ``need_weights`` path.

The reference is PyTorch's own ``softmax(scores, -1).mean(1)`` in float64, with a head's row of
all ``-inf`` (every key masked) counted as zero weight. On the CPU the op is that composition;
on CUDA it is a kernel of its own (csrc/cuda/head_mean_softmax.cu), checked here where a GPU is.
"""

from typing import Tuple

import pytest
import torch
from conftest import DEVICES
from torch import Tensor

head_mean_softmax = torch.ops.torchmha._head_mean_softmax.default

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def reference(scores: Tensor) -> Tensor:
    """PyTorch's softmax over keys, averaged over heads in float64; all -inf rows add zero."""
    scores = scores.double()
    probabilities = scores.softmax(-1)
    all_masked = scores.isneginf().all(-1, keepdim=True)
    return probabilities.masked_fill(all_masked, 0).mean(1)


def masked_scores(shape: Tuple[int, int, int, int], dtype: torch.dtype, device: str) -> Tensor:
    """Random scores with a partly masked row, a head's fully masked row and a query row masked
    in every head."""
    scores = torch.randn(shape, dtype=torch.float64, device=device) * 3
    scores[0, 0, 0, 1:] = float("-inf")
    if shape[1] > 1:
        scores[0, 1, min(1, shape[2] - 1), :] = float("-inf")
    scores[-1, :, -1, :] = float("-inf")
    return scores.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_and_gradgradcheck(device: str) -> None:
    """Derivatives to second order in float64, masked rows included (finite, zero there)."""
    torch.manual_seed(0)
    scores = masked_scores((2, 3, 4, 5), torch.float64, device).requires_grad_()
    assert torch.autograd.gradcheck(head_mean_softmax, (scores,))
    assert torch.autograd.gradgradcheck(head_mean_softmax, (scores,))
    (grad,) = torch.autograd.grad(head_mean_softmax(scores).square().sum(), scores)
    assert torch.isfinite(grad).all()
    assert grad[-1, :, -1].abs().max() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device: str) -> None:
    """Schema, autograd registration, fake tensors and AOT dispatch."""
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 4, 6, device=device, requires_grad=True)
    torch.library.opcheck(head_mean_softmax, (scores,))


def test_rejects_scores_that_are_not_four_dimensional() -> None:
    with pytest.raises(RuntimeError, match=r"expected \(N, H, L, S\) scores"):
        head_mean_softmax(torch.randn(3, 4, 5))


@needs_cuda
def test_cuda_has_a_kernel_of_its_own() -> None:
    """The extension built on a CUDA machine registers the CUDA kernel (not the composition)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("torchmha::_head_mean_softmax", "CUDA")


# Source lengths that take the 16-byte loads (multiples of 8) and that do not; 1 to 33 heads.
CUDA_SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (2, 4, 3, 16), (3, 16, 9, 1000), (1, 33, 2, 4096)]
CUDA_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=str)
def test_cuda_kernel_matches_pytorch(shape: Tuple[int, int, int, int], dtype: torch.dtype) -> None:
    """Within one rounding of ``dtype`` of the float64 reference on the same scores."""
    torch.manual_seed(0)
    scores = masked_scores(shape, dtype, "cuda")
    weights = head_mean_softmax(scores)
    assert weights.dtype == dtype and weights.shape == (shape[0], shape[2], shape[3])
    torch.testing.assert_close(
        weights.double(), reference(scores), rtol=torch.finfo(dtype).eps, atol=1e-6
    )
    assert weights[-1, -1].abs().max() == 0


@needs_cuda
def test_cuda_kernel_propagates_nan_and_infinity_like_softmax() -> None:
    """A row with NaN or +inf is NaN in softmax, hence in the mean; other rows stay finite."""
    scores = torch.randn(1, 2, 3, 8, device="cuda")
    scores[0, 0, 0, 3] = float("nan")
    scores[0, 1, 1, 5] = float("inf")
    scores[0, 0, 2, :] = float("-inf")
    scores[0, 0, 2, 4] = float("nan")
    weights = head_mean_softmax(scores)
    torch.testing.assert_close(weights, reference(scores).float(), equal_nan=True)
    assert weights[0, :2].isnan().all() and weights[0, 2].isnan().all()


@needs_cuda
def test_cuda_kernel_reads_non_contiguous_scores() -> None:
    torch.manual_seed(0)
    scores = torch.randn(2, 8, 3, 4, device="cuda").transpose(1, 3)
    torch.testing.assert_close(head_mean_softmax(scores).double(), reference(scores))
