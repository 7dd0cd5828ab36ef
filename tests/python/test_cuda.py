"""CUDA: torchmha against torch.nn.MultiheadAttention in float32, bfloat16 and float16.

Skipped (and reported as skipped) without a GPU; ``scripts/gpu_check.sh`` runs it on one. The
truth is PyTorch's module in float64 on the same device; in each dtype torchmha may be at most
twice as far from it as PyTorch's own module in that dtype.
"""

import copy
import functools
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from conftest import TOLERANCES
from interchange_models import (
    GENERATED,
    GreedyDecoder,
    greedy_generation,
    padded_prompts,
    randomize,
)
from torch import Tensor, nn
from torch.export import Dim
from torch.nn.attention import SDPBackend, sdpa_kernel

import torchmha

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
EMBED_DIM, NUM_HEADS, BATCH, LENGTH = 64, 4, 3, 17
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Low precision is judged against PyTorch in the same dtype: torchmha's error to the float64
# result may be at most twice PyTorch's own, plus a floor for when PyTorch's is tiny.
ERROR_FLOOR: Dict[torch.dtype, float] = {
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-3,
}


def make_reference() -> nn.MultiheadAttention:
    """PyTorch's module in float64 with random weights (biases too)."""
    reference = nn.MultiheadAttention(EMBED_DIM, NUM_HEADS, batch_first=True)
    reference = reference.to(DEVICE, torch.float64)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return reference


def make_pair(dtype: torch.dtype) -> tuple:
    """A float64 PyTorch reference and a torchmha module in ``dtype`` with the same weights."""
    reference = make_reference()
    candidate = torchmha.MultiHeadAttention(EMBED_DIM, NUM_HEADS, batch_first=True)
    candidate.load_state_dict(reference.state_dict())
    return reference, candidate.to(DEVICE, dtype)


def masks(kind: str) -> Dict[str, Optional[Tensor]]:
    """Keyword masks for ``forward``; True = not allowed, one key always visible."""
    if kind == "none":
        return {}
    if kind == "padding":
        padding = torch.zeros(BATCH, LENGTH, dtype=torch.bool, device=DEVICE)
        padding[1, LENGTH // 2 :] = True
        return {"key_padding_mask": padding}
    causal = torch.ones(LENGTH, LENGTH, dtype=torch.bool, device=DEVICE).triu(1)
    return {"attn_mask": causal}


def results(module: nn.Module, x: Tensor, cotangent: Tensor, **kwargs) -> List[Tensor]:
    """Output, input gradient and (if asked for) weights, in float64 for comparison."""
    dtype = next(module.parameters()).dtype
    leaf = x.to(dtype).requires_grad_()
    output, weights = module(leaf, leaf, leaf, **kwargs)
    (grad,) = torch.autograd.grad((output.double() * cotangent).sum(), leaf)
    return [t.double() for t in (output, grad, weights) if t is not None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal"])
def test_forward_and_backward_match_pytorch(
    dtype: torch.dtype, need_weights: bool, mask_kind: str
) -> None:
    """Output, input gradient and weights: no further from float64 than PyTorch in ``dtype``."""
    torch.manual_seed(0)
    reference, candidate = make_pair(dtype)
    pytorch_in_dtype = copy.deepcopy(reference).to(dtype)
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, device=DEVICE, dtype=torch.float64)
    cotangent = torch.randn_like(x)
    kwargs = dict(masks(mask_kind), need_weights=need_weights)

    exact = results(reference, x, cotangent, **kwargs)
    ours = results(candidate, x, cotangent, **kwargs)
    theirs = results(pytorch_in_dtype, x, cotangent, **kwargs)
    assert len(ours) == len(exact) == (3 if need_weights else 2)
    for name, mine, pytorch, truth in zip(("output", "grad", "weights"), ours, theirs, exact):
        our_error = (mine - truth).abs().max().item()
        pytorch_error = (pytorch - truth).abs().max().item()
        assert our_error <= 2 * pytorch_error + ERROR_FLOOR[dtype], (
            f"{name}: torchmha is {our_error:.2e} from float64, PyTorch {pytorch_error:.2e}"
        )


BACKENDS = [SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda backend: backend.name)
def test_fully_masked_query_is_zero_on_every_backend(dtype: torch.dtype, backend) -> None:
    """A query with every key masked gets out_proj.bias as output and finite gradients."""
    torch.manual_seed(0)
    _, candidate = make_pair(dtype)
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, device=DEVICE, dtype=dtype, requires_grad=True)
    attn_mask = torch.zeros(LENGTH, LENGTH, dtype=torch.bool, device=DEVICE)
    attn_mask[3] = True
    try:
        with sdpa_kernel([backend]):
            output, _ = candidate(x, x, x, attn_mask=attn_mask, need_weights=False)
            (grad,) = torch.autograd.grad(output.float().sum(), x)
    except RuntimeError as error:
        if "No available kernel" in str(error):
            pytest.skip(f"{backend.name} does not take this input here: {error}")
        raise
    assert torch.isfinite(output).all()
    assert torch.isfinite(grad).all()
    expected_row = candidate.out_proj.bias.expand(BATCH, EMBED_DIM)
    torch.testing.assert_close(output[:, 3], expected_row, atol=0.0, rtol=0.0)


def test_flash_backend_is_used_for_unmasked_bfloat16() -> None:
    """Without a mask, bfloat16 self-attention runs on the flash backend alone."""
    torch.manual_seed(0)
    reference, candidate = make_pair(torch.bfloat16)
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, device=DEVICE, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        output, _ = candidate(x, x, x, need_weights=False)
    expected, _ = reference(x.double(), x.double(), x.double(), need_weights=False)
    error = (output.double() - expected).abs().max().item()
    pytorch_error = reference.to(torch.bfloat16)(x, x, x, need_weights=False)[0].double() - expected
    assert error <= 2 * pytorch_error.abs().max().item() + ERROR_FLOOR[torch.bfloat16]


def test_opcheck_on_cuda() -> None:
    """torch.library.opcheck (schema, autograd registration, fake tensors, AOT) on CUDA."""
    torch.manual_seed(0)
    _, candidate = make_pair(torch.float32)
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, device=DEVICE, requires_grad=True)
    padding = masks("padding")["key_padding_mask"]
    for need_weights in (False, True):
        torch.library.opcheck(
            torch.ops.torchmha.multi_head_attention.default,
            (x, x, x, NUM_HEADS, candidate.in_proj_weight, candidate.in_proj_bias, None, None),
            {
                "v_proj_weight": None,
                "out_proj_weight": candidate.out_proj.weight,
                "out_proj_bias": candidate.out_proj.bias,
                "key_padding_mask": padding,
                "need_weights": need_weights,
                "batch_first": True,
            },
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal"])
def test_gradients_through_the_weights_match_pytorch(dtype: torch.dtype, mask_kind: str) -> None:
    """With the averaged weights in the loss too (their backward is the head-mean kernel op's):
    output, weights and input gradient no further from float64 than PyTorch in ``dtype``."""
    torch.manual_seed(0)
    reference, candidate = make_pair(dtype)
    pytorch_in_dtype = copy.deepcopy(reference).to(dtype)
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, device=DEVICE, dtype=torch.float64)
    cotangent = torch.randn_like(x)
    weights_cotangent = torch.randn(BATCH, LENGTH, LENGTH, device=DEVICE, dtype=torch.float64)

    def found(module: nn.Module) -> List[Tensor]:
        leaf = x.to(next(module.parameters()).dtype).requires_grad_()
        output, weights = module(leaf, leaf, leaf, **masks(mask_kind))
        loss = (output.double() * cotangent).sum() + (weights.double() * weights_cotangent).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
        return [t.double() for t in (output, weights, grad)]

    exact, ours, theirs = found(reference), found(candidate), found(pytorch_in_dtype)
    for name, mine, pytorch, truth in zip(("output", "weights", "grad"), ours, theirs, exact):
        our_error = (mine - truth).abs().max().item()
        pytorch_error = (pytorch - truth).abs().max().item()
        assert our_error <= 2 * pytorch_error + ERROR_FLOOR[dtype], (
            f"{name}: torchmha is {our_error:.2e} from float64, PyTorch {pytorch_error:.2e}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows_with_weights(dtype: torch.dtype) -> None:
    """A head's fully masked row adds zero to the averaged weights (PyTorch's per-head weights,
    NaN there, read as zero); a query masked in every head gets zero weights, out_proj.bias as
    output and finite gradients."""
    torch.manual_seed(0)
    reference, candidate = make_pair(dtype)
    attn_mask = torch.rand(BATCH * NUM_HEADS, LENGTH, LENGTH, device=DEVICE) < 0.3
    attn_mask[..., 0] = False
    attn_mask[0, 2] = True  # batch entry 0, head 0, query 2
    attn_mask[:, 3] = True  # query 3, every head
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, device=DEVICE, dtype=torch.float64)
    leaf = x.to(dtype).requires_grad_()
    output, weights = candidate(leaf, leaf, leaf, attn_mask=attn_mask)
    (grad,) = torch.autograd.grad(output.float().sum() + weights.float().square().sum(), leaf)
    assert torch.isfinite(output).all() and torch.isfinite(grad).all()
    _, per_head = reference(x, x, x, attn_mask=attn_mask, average_attn_weights=False)
    expected = per_head.nan_to_num(0.0).mean(1)
    tolerance = ERROR_FLOOR[dtype] if dtype != torch.float32 else 1e-6
    torch.testing.assert_close(weights.double(), expected, atol=tolerance, rtol=0)
    assert weights[:, 3].abs().max() == 0
    torch.testing.assert_close(
        output[:, 3], candidate.out_proj.bias.expand(BATCH, EMBED_DIM), atol=0.0, rtol=0.0
    )


def kernel_names(call: Callable[[], object]) -> List[str]:
    """The CUDA kernels one call launches."""
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad(), torch.profiler.profile(activities=activities) as profile:
        call()
        torch.cuda.synchronize()
    return [event.name for event in profile.events()]


def runs_head_mean_kernel(call: Callable[[], object]) -> bool:
    return any("head_mean_softmax" in name for name in kernel_names(call))


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str
)
def test_need_weights_takes_the_head_mean_kernel_in_half_precision(dtype: torch.dtype) -> None:
    """bfloat16 and float16 weights come from the head-mean kernel (no per-head softmax);
    float32 and float64 keep the explicit path (SDPA is no faster than its GEMMs there)."""
    _, candidate = make_pair(dtype)
    x = torch.randn(BATCH, LENGTH, EMBED_DIM, device=DEVICE, dtype=dtype)
    uses_kernel = runs_head_mean_kernel(lambda: candidate(x, x, x, need_weights=True))
    assert uses_kernel == (dtype in (torch.bfloat16, torch.float16))


class SelfAttentionWithWeights(nn.Module):
    """Self-attention with a padding mask, returning the averaged weights too."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: Tensor, padding: Tensor) -> tuple:
        return self.attention(x, x, x, key_padding_mask=padding)


def padded_input(sequence: int) -> Tuple[Tensor, Tensor]:
    x = torch.randn(BATCH, sequence, EMBED_DIM, device=DEVICE, dtype=torch.bfloat16)
    padding = torch.zeros(BATCH, sequence, dtype=torch.bool, device=DEVICE)
    padding[1, sequence // 2 :] = True
    return x, padding


def test_compiled_and_exported_need_weights_take_the_eager_path() -> None:
    """In bfloat16, torch.compile's graph and torch.export's program (dynamic length) run the
    head-mean kernel as eager does, and compute what eager computes."""
    torch.manual_seed(0)
    _, candidate = make_pair(torch.bfloat16)
    model = SelfAttentionWithWeights(candidate)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    length = Dim("length", min=2, max=64)
    program = torch.export.export(
        model, padded_input(LENGTH), dynamic_shapes=({1: length}, {1: length})
    ).module()
    for sequence in (5, LENGTH, 40):
        x, padding = padded_input(sequence)
        with torch.no_grad():
            expected = model(x, padding)
        for name, traced in (("compiled", compiled), ("exported", program)):
            assert runs_head_mean_kernel(functools.partial(traced, x, padding)), name
            with torch.no_grad():
                found = traced(x, padding)
            for part, ours, eager in zip(("output", "weights"), found, expected):
                torch.testing.assert_close(ours, eager, msg=f"{name} {part}")


# Runs a package in a process that never imports torchmha (as a C++ program without libtorchmha).
RUN_PACKAGE_WITHOUT_TORCHMHA = """
import sys, torch
assert "torchmha" not in sys.modules
runner = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.randn(3, 9, 64, device="cuda", dtype=torch.bfloat16)
padding = torch.zeros(3, 9, dtype=torch.bool, device="cuda")
torch.cuda.synchronize()
runner(x, padding)
torch.cuda.synchronize()
print("ran without torchmha")
"""


def test_aoti_package_with_weights_needs_torchmha_exactly_when_it_names_it(
    tmp_path: Path,
) -> None:
    """An AOTInductor package of bfloat16 self-attention with averaged weights (dynamic length)
    computes what eager computes; it runs in a process without torchmha exactly when none of its
    files names torchmha (an op left for the proxy executor is named there), which is what the
    interop page tells C++ programs about linking libtorchmha."""
    torch.manual_seed(0)
    _, candidate = make_pair(torch.bfloat16)
    model = SelfAttentionWithWeights(candidate).eval()
    length = Dim("length", min=2, max=64)
    program = torch.export.export(
        model, padded_input(LENGTH), dynamic_shapes=({1: length}, {1: length})
    )
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "weights.pt2")
    )
    runner = torch._inductor.aoti_load_package(package)
    for sequence in (5, LENGTH, 40):
        x, padding = padded_input(sequence)
        with torch.no_grad():
            expected = model(x, padding)
        found = runner(x, padding)
        for part, ours, eager in zip(("output", "weights"), found, expected):
            torch.testing.assert_close(
                ours, eager, atol=ERROR_FLOOR[torch.bfloat16], rtol=1.6e-2, msg=f"{part} {sequence}"
            )
    with zipfile.ZipFile(package) as archive:
        # An op's name, not the bare word (generated sources quote paths, maybe a torchmha
        # folder) nor the op's messages ("torchmha.multi_head_attention: ..." in asserts).
        op_name = re.compile(rb"torchmha(::|\.)(multi_head_attention|_head_mean_softmax)(?!: )")
        names_torchmha = any(op_name.search(archive.read(info)) for info in archive.infolist())
    alone = subprocess.run(
        [sys.executable, "-c", RUN_PACKAGE_WITHOUT_TORCHMHA, package],
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(f"package names torchmha: {names_torchmha}; runs without it: {alone.returncode == 0}")
    assert (alone.returncode == 0) == (not names_torchmha), alone.stderr[-2000:]


def test_cached_decoding_step_replays_one_cuda_graph() -> None:
    """torch.compile(mode="reduce-overhead", fullgraph=True) of a decoder that owns its
    key/value cache: after a ragged prefill (eager), every single-token step runs the one graph
    compiled at the first, in CUDA graphs (none skipped: the cache's buffers are written in place
    by the replays), and the tokens, logits and cache equal eager's in float64."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    eager = randomize(GreedyDecoder()).to(DEVICE, torch.float64)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    graphs: List[int] = []

    def replayed_step(tokens: Tensor, padding: Tensor) -> Tuple[Tensor, Tensor]:
        torch.compiler.cudagraph_mark_step_begin()
        # A replay overwrites the previous one's outputs: keep copies.
        next_tokens, logits = (output.clone() for output in compiled(tokens, padding))
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return next_tokens, logits

    tokens, padding = (tensor.to(DEVICE) for tensor in padded_prompts())
    expected = greedy_generation(eager, tokens, padding)
    actual = greedy_generation(replayed_step, tokens, padding, prefill=model)
    assert graphs == [1] * (GENERATED - 1)
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    assert torch.equal(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], **TOLERANCES[torch.float64])
    for name in ("key", "value", "seq_lens"):
        torch.testing.assert_close(
            getattr(model.cache, name), getattr(eager.cache, name), **TOLERANCES[torch.float64]
        )


# --- decoding with a key/value cache -------------------------------------------------------------

CACHE_STEPS = (20, 1, 1, 3, 1)  # a prefill through SDPA, then tokens and a chunk (grouped GEMMs)


def decode(attention: nn.Module, sequence: Tensor, steps=CACHE_STEPS) -> Tensor:
    """The outputs of ``sequence`` (N, T, E) decoded through a cache, step after step."""
    cache = attention.new_kv_cache(sequence.shape[0], sequence.shape[1] + 2)
    outputs, start = [], 0
    with torch.inference_mode():
        for length in steps:
            chunk = sequence[:, start : start + length]
            output, _ = attention(
                chunk, chunk, chunk, kv_cache=cache, is_causal=True, need_weights=False
            )
            outputs.append(output)
            start += length
    return torch.cat(outputs, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decoding_with_a_cache_on_cuda(dtype: torch.dtype) -> None:
    """Grouped heads and rotary embeddings, decoded on the GPU: the error to the same decoding in
    float64 is at most twice that of the full causal forward in ``dtype`` (plus the floor)."""
    torch.manual_seed(0)
    attention = torchmha.MultiHeadAttention(
        EMBED_DIM, NUM_HEADS, batch_first=True, num_kv_heads=2, rope_theta=10000.0
    ).to(DEVICE, torch.float64)
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    sequence = torch.randn(BATCH, sum(CACHE_STEPS), EMBED_DIM, device=DEVICE, dtype=torch.float64)
    truth = decode(attention, sequence)
    with torch.inference_mode():
        full_truth, _ = attention(sequence, sequence, sequence, is_causal=True, need_weights=False)
    torch.testing.assert_close(truth, full_truth, atol=1e-10, rtol=1e-10)
    low = copy.deepcopy(attention).to(dtype)
    ours = decode(low, sequence.to(dtype)).double()
    with torch.inference_mode():
        full, _ = low(*(sequence.to(dtype),) * 3, is_causal=True, need_weights=False)
    our_error = (ours - truth).abs().max().item()
    full_error = (full.double() - truth).abs().max().item()
    assert our_error <= 2 * full_error + ERROR_FLOOR[dtype], (our_error, full_error)
