"""TorchScript: the Python modules script, and the scripted modules compute what eager ones do."""

import pytest
import torch
from conftest import assert_close, make_mha_pair, randomize_parameters

import torchmha
from torchmha.testing import ChapterMultiHeadAttention

# torch.jit.script is deprecated in favour of torch.compile/export, but TorchScript is supported.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [False, True])
def test_scripted_multi_head_attention_matches_eager_and_pytorch(
    batch_first: bool, need_weights: bool
) -> None:
    """The scripted module calls the same op: equal to eager, and to PyTorch's module."""
    reference, eager = make_mha_pair(8, 2, torch.float64, batch_first=batch_first)
    scripted = torch.jit.script(eager)
    query = torch.randn(3, 4, 8, dtype=torch.float64)
    key = torch.randn(3, 6, 8, dtype=torch.float64)
    key_padding_mask = torch.zeros(3 if batch_first else 4, 6, dtype=torch.bool)
    key_padding_mask[:, -2:] = True
    if not batch_first:
        # (L, N, E) layout: swap dims and give the mask the batch size of dim 1.
        query, key = query.transpose(0, 1), key.transpose(0, 1)
        key_padding_mask = key_padding_mask[:3]
    kwargs = {"key_padding_mask": key_padding_mask, "need_weights": need_weights}

    output, weights = scripted(query, key, key, **kwargs)
    eager_output, eager_weights = eager(query, key, key, **kwargs)
    expected_output, expected_weights = reference(query, key, key, **kwargs)
    # Same op and same arguments, so scripting must not change a single bit.
    assert torch.equal(output, eager_output)
    assert_close(output, expected_output)
    if need_weights:
        assert weights is not None and eager_weights is not None
        assert torch.equal(weights, eager_weights)
        assert_close(weights, expected_weights)
    else:
        assert weights is None and expected_weights is None


def test_scripted_multi_head_attention_is_causal_and_backward() -> None:
    """Keyword-only arguments and autograd also work through the scripted module."""
    reference, eager = make_mha_pair(8, 2, torch.float64)
    scripted = torch.jit.script(eager)
    query = torch.randn(5, 2, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(5, 5, dtype=torch.bool).triu(1)
    output, _ = scripted(query, query, query, need_weights=False, is_causal=True)
    expected, _ = reference(query, query, query, attn_mask=mask, need_weights=False)
    assert_close(output, expected)
    (gradient,) = torch.autograd.grad(output.sum(), query)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), query)
    assert_close(gradient, expected_gradient)


def test_scripted_textbook_matches_eager_and_the_chapter() -> None:
    """The scripted chapter adapter equals eager and the chapter's module, ``attn`` included."""
    chapter = ChapterMultiHeadAttention(2, 8).double().eval()
    randomize_parameters(chapter)
    eager = torchmha.TextbookMultiHeadAttention(2, 8).double().eval()
    eager.load_state_dict(chapter.state_dict())
    scripted = torch.jit.script(eager)
    query = torch.randn(3, 4, 8, dtype=torch.float64)
    key = torch.randn(3, 6, 8, dtype=torch.float64)
    mask = torch.ones(3, 1, 4, 6, dtype=torch.int64).tril()

    output = scripted(query, key, key, mask)
    assert torch.equal(output, eager(query, key, key, mask))
    assert torch.equal(scripted.attn, eager.attn)
    assert_close(output, chapter(query, key, key, mask))
    assert_close(scripted.attn, chapter.attn)
