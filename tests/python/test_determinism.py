"""The same seed gives bitwise-identical results on CPU, dropout included.

The op has no generator argument: dropout draws from PyTorch's default CPU generator
(``torch.default_generator``), so ``torch.manual_seed``, ``torch.random.fork_rng`` and a
generator state moved in with ``set_state`` (e.g. from an explicit ``torch.Generator``) decide
the dropout masks.
"""

from typing import Callable, Dict, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import torchmha

MODULES: Dict[str, Callable[..., nn.Module]] = {
    "python": torchmha.MultiHeadAttention,
    "cpp": torchmha.cpp.MultiHeadAttention,
}


def training_step(module_type: Callable[..., nn.Module], need_weights: bool) -> Tuple[Tensor, ...]:
    """Builds a module with dropout and its input from the current random state, runs a forward
    and backward pass, and returns the output, the weights and the gradients."""
    module = module_type(16, 4, dropout=0.5).train()
    query = torch.randn(6, 3, 16, requires_grad=True)
    output, weights = module(query, query, query, need_weights=need_weights)
    output.square().sum().backward()
    results = (output, query.grad, *(p.grad for p in module.parameters()))
    return results if weights is None else (*results, weights)


def assert_bitwise_equal(first: Tuple[Tensor, ...], second: Tuple[Tensor, ...]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_same_seed_gives_bitwise_identical_results(kind: str, need_weights: bool) -> None:
    torch.manual_seed(42)
    first = training_step(MODULES[kind], need_weights)
    torch.manual_seed(42)
    assert_bitwise_equal(first, training_step(MODULES[kind], need_weights))
    torch.manual_seed(43)
    assert not torch.equal(first[0], training_step(MODULES[kind], need_weights)[0])


def dropout_call(module: nn.Module, query: Tensor, need_weights: bool = True) -> Tensor:
    return module(query, query, query, need_weights=need_weights)[0]


@pytest.fixture
def module_and_query() -> Tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return torchmha.MultiHeadAttention(16, 4, dropout=0.5).train(), torch.randn(6, 3, 16)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_follows_the_default_generator_state(
    module_and_query: Tuple[nn.Module, Tensor], need_weights: bool
) -> None:
    module, query = module_and_query
    state = torch.get_rng_state()
    first = dropout_call(module, query, need_weights)
    second = dropout_call(module, query, need_weights)
    assert not torch.equal(first, second), "dropout drew the same mask twice"
    torch.set_rng_state(state)
    assert torch.equal(dropout_call(module, query, need_weights), first)
    assert torch.equal(dropout_call(module, query, need_weights), second)


def test_explicit_generator_state_decides_the_masks(
    module_and_query: Tuple[nn.Module, Tensor],
) -> None:
    """An explicit ``torch.Generator``'s state, moved into the default generator, reproduces
    what that generator's seed gives."""
    module, query = module_and_query
    generator = torch.Generator().manual_seed(1234)
    torch.default_generator.set_state(generator.get_state())
    from_generator = dropout_call(module, query)
    torch.manual_seed(1234)
    assert torch.equal(dropout_call(module, query), from_generator)


def test_fork_rng_keeps_the_outer_stream(module_and_query: Tuple[nn.Module, Tensor]) -> None:
    """Dropout inside ``torch.random.fork_rng`` does not move the caller's random stream."""
    module, query = module_and_query
    state = torch.get_rng_state()
    expected_next = torch.rand(4)
    torch.set_rng_state(state)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        inside = dropout_call(module, query)
    assert torch.equal(torch.rand(4), expected_next)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        assert torch.equal(dropout_call(module, query), inside)


def test_op_dropout_is_reproducible_and_off_without_training() -> None:
    """The op itself: seeded dropout repeats; ``training=False`` ignores the generator."""
    torch.manual_seed(0)
    query = torch.randn(6, 3, 16)
    weights = {
        "in_proj_weight": torch.randn(48, 16),
        "in_proj_bias": torch.randn(48),
        "out_proj_weight": torch.randn(16, 16),
        "out_proj_bias": torch.randn(16),
    }

    def call(seed: int, training: bool) -> Tuple[Tensor, Optional[Tensor]]:
        torch.manual_seed(seed)
        return torchmha.multi_head_attention(
            query, query, query, 4, **weights, dropout_p=0.5, training=training
        )

    assert_bitwise_equal(call(1, True), call(1, True))
    assert not torch.equal(call(1, True)[0], call(2, True)[0])
    assert_bitwise_equal(call(1, False), call(2, False))
