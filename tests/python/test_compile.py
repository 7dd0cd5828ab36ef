"""torch.compile: no graph break, eager's numbers, training, one graph for every length."""

import pytest
import torch
from interchange_models import (
    EMBED_DIM,
    AttentionBlock,
    DecoderBlock,
    TextbookBlock,
    positions_of_length,
    randomize,
)
from torch._dynamo.testing import CompileCounterWithBackend

import torchmha


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()


def test_compiled_block_matches_eager_and_trains() -> None:
    """fullgraph=True with inductor: forward and every gradient equal eager's."""
    model = randomize(AttentionBlock()).train()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = torch.randn(2, 7, EMBED_DIM, requires_grad=True)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -2:] = True

    expected = model(x, padding)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *model.parameters()])
    actual = compiled(x, padding)
    actual_grads = torch.autograd.grad(actual.square().sum(), [x, *model.parameters()])

    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads):
        torch.testing.assert_close(actual_grad, expected_grad, atol=1e-5, rtol=1e-4)


def test_dynamic_lengths_compile_once() -> None:
    """With dynamic shapes, new sequence lengths reuse the one compiled graph."""
    model = randomize(AttentionBlock())
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    compiles_per_length = []
    with torch.no_grad():
        for length in (5, 8, 11, 16):
            x = torch.randn(2, length, EMBED_DIM)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-4)
            compiles_per_length.append(counter.frame_count)
    # Whatever the first call compiled serves every later length.
    assert compiles_per_length[0] > 0
    assert compiles_per_length == [compiles_per_length[0]] * 4


def test_grouped_rotary_block_compiles_once_and_trains_at_every_length() -> None:
    """Grouped-query attention with rotary embeddings and positions: fullgraph=True and
    dynamic=True, forward and every gradient equal eager's at each length, one compilation."""
    model = randomize(DecoderBlock()).train()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    compiles_per_length = []
    for length in (5, 8, 11, 16):
        x = torch.randn(2, length, EMBED_DIM, requires_grad=True)
        positions = positions_of_length(length)
        expected = model(x, positions)
        expected_grads = torch.autograd.grad(expected.square().sum(), [x, *model.parameters()])
        actual = compiled(x, positions)
        actual_grads = torch.autograd.grad(actual.square().sum(), [x, *model.parameters()])
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
        for actual_grad, expected_grad in zip(actual_grads, expected_grads):
            torch.testing.assert_close(actual_grad, expected_grad, atol=1e-5, rtol=1e-4)
        compiles_per_length.append(counter.frame_count)
    # Whatever the first call compiled serves every later length.
    assert compiles_per_length[0] > 0
    assert compiles_per_length == [compiles_per_length[0]] * 4


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("average_attn_weights", [False, True])
def test_op_paths_compile_without_graph_breaks(
    need_weights: bool, average_attn_weights: bool
) -> None:
    """Each path of the op (SDPA, explicit softmax, per-head weights) traces in one graph."""
    attention = torchmha.MultiHeadAttention(EMBED_DIM, 4).eval()
    x = torch.randn(6, 3, EMBED_DIM)
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)

    def run(query: torch.Tensor):
        return attention(
            query,
            query,
            query,
            attn_mask=mask,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
        )

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    expected, actual = run(x), compiled(x)
    torch.testing.assert_close(actual[0], expected[0])
    if need_weights:
        torch.testing.assert_close(actual[1], expected[1])


def test_textbook_adapter_compiles() -> None:
    """The chapter's adapter (mask conversion included) compiles with fullgraph=True."""
    model = randomize(TextbookBlock())
    x = torch.randn(2, 7, EMBED_DIM)
    mask = torch.ones(2, 1, 1, 7)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, mask), model(x, mask))
