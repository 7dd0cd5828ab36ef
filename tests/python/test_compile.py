"""torch.compile: no graph break, eager's numbers, training, one graph for every length."""

import copy
from typing import Callable, List, Tuple, Union

import pytest
import torch
from conftest import TOLERANCES
from interchange_models import (
    EMBED_DIM,
    GENERATED,
    AttentionBlock,
    DecoderBlock,
    GreedyDecoder,
    TextbookBlock,
    greedy_generation,
    padded_prompts,
    positions_of_length,
    randomize,
)
from torch import Tensor
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend

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


Step = Callable[[Tensor, Tensor], Tuple[Tensor, Tensor]]


def counting_compiles(
    step: Step, counter: Union[CompileCounter, CompileCounterWithBackend], compiles: List[int]
) -> Step:
    """`step`, appending the counter's compilations so far after each call."""

    def counted(tokens: Tensor, padding: Tensor) -> Tuple[Tensor, Tensor]:
        result = step(tokens, padding)
        compiles.append(counter.frame_count)
        return result

    return counted


def assert_same_generation_and_cache(
    actual: Tuple[Tensor, Tensor],
    expected: Tuple[Tensor, Tensor],
    model: GreedyDecoder,
    eager: GreedyDecoder,
) -> None:
    """Same tokens, logits within float64's tolerance, and the same cache afterwards."""
    assert torch.equal(actual[0], expected[0])
    torch.testing.assert_close(actual[1], expected[1], **TOLERANCES[torch.float64])
    torch.testing.assert_close(model.cache.key, eager.cache.key, **TOLERANCES[torch.float64])
    torch.testing.assert_close(model.cache.value, eager.cache.value, **TOLERANCES[torch.float64])
    assert torch.equal(model.cache.seq_lens, eager.cache.seq_lens)


def test_cached_decoding_step_compiles_once_with_inductor() -> None:
    """torch.compile(fullgraph=True) with Inductor of a decoder that owns its key/value cache
    (buffers the compiled graph writes): after a ragged prefill (eager), every single-token step
    runs the one graph compiled at the first (entries at different lengths), and the tokens,
    logits and cache equal eager's in float64."""
    eager = randomize(GreedyDecoder()).double()
    model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    compiles: List[int] = []
    counted = counting_compiles(compiled, counter, compiles)
    tokens, padding = padded_prompts()
    expected = greedy_generation(eager, tokens, padding)
    # The prefill runs the same module (and cache) eagerly: one Inductor compilation in all.
    actual = greedy_generation(counted, tokens, padding, prefill=model)
    assert compiles == [1] * (GENERATED - 1)
    assert_same_generation_and_cache(actual, expected, model, eager)


def test_whole_generation_compiles_once_per_step_shape() -> None:
    """The prefill and every single-token step through one compiled module (fullgraph=True):
    the prefill compiles a graph, the first single-token step another, and no later step
    compiles again; the tokens, logits and cache equal eager's."""
    eager = randomize(GreedyDecoder()).double()
    model = copy.deepcopy(eager)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    compiles: List[int] = []
    tokens, padding = padded_prompts()
    expected = greedy_generation(eager, tokens, padding)
    actual = greedy_generation(counting_compiles(compiled, counter, compiles), tokens, padding)
    assert compiles == [1] + [2] * (GENERATED - 1)
    assert_same_generation_and_cache(actual, expected, model, eager)


def test_compile_caches_key_on_the_extension_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """AOTAutograd's on-disk cache keys a graph on the op's name, not on the ATen ops it
    decomposes into: importing torchmha adds the extension build's identity to the cache key
    tag, so a graph saved by one build is a hit for that build only, never for a rebuild."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import fresh_cache

    from torchmha._compile_cache import extension_identity

    identity = extension_identity(torchmha._C.__file__)
    assert identity in torch.compiler.config.cache_key_tag
    model = randomize(AttentionBlock()).eval()
    x = torch.randn(2, 5, EMBED_DIM)
    padding = torch.zeros(2, 5, dtype=torch.bool)

    def compile_and_run() -> None:
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, fullgraph=True, backend="inductor")(x, padding)

    with fresh_cache():
        counters.clear()
        compile_and_run()
        assert counters["aot_autograd"]["autograd_cache_saved"] == 1
        compile_and_run()
        assert counters["aot_autograd"]["autograd_cache_hit"] == 1  # the same build: a hit
        # Another build of the extension (another identity) must not get that graph.
        other_build = torch.compiler.config.cache_key_tag.replace(identity, "torchmha:0:0")
        monkeypatch.setattr(torch.compiler.config, "cache_key_tag", other_build)
        compile_and_run()
        assert counters["aot_autograd"]["autograd_cache_hit"] == 1
        assert counters["aot_autograd"]["autograd_cache_miss"] == 2
