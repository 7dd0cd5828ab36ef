"""TorchScript: the Python modules script, and the scripted modules compute what eager ones do.

TorchScript is PyTorch's deprecated path. The scripting tests skip, with PyTorch's reason, where
the installed PyTorch refuses it; the package itself must work without it.
"""

import os
import subprocess
import sys
import warnings
from typing import Optional

import pytest
import torch
from conftest import assert_close, make_mha_pair, randomize_parameters

import torchmha
from torchmha.testing import ChapterMultiHeadAttention

# These tests script on purpose: PyTorch's deprecation warning (DeprecationWarning in 2.13,
# FutureWarning later) is expected here and nowhere else.
SCRIPTING_WARNINGS = pytest.mark.filterwarnings("ignore:`torch.jit.(script|trace)` is deprecated")


def torchscript_refusal() -> Optional[str]:
    """Why this PyTorch refuses TorchScript (a missing API or a raised error), or None."""
    if not hasattr(torch.jit, "script"):
        return "this PyTorch has no torch.jit.script"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(torch.nn.Identity())
    except Exception as error:  # Whatever PyTorch raises to say TorchScript is gone.
        return f"this PyTorch refuses torch.jit.script: {type(error).__name__}: {error}"
    return None


REQUIRES_TORCHSCRIPT = pytest.mark.skipif(
    torchscript_refusal() is not None, reason=str(torchscript_refusal())
)
pytestmark = [SCRIPTING_WARNINGS]


@REQUIRES_TORCHSCRIPT
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


@REQUIRES_TORCHSCRIPT
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


@REQUIRES_TORCHSCRIPT
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


# Run in a fresh process: TorchScript's entry points raise or are missing there, as they will be
# once PyTorch removes TorchScript. torch's own modules are imported before, as they are today.
WITHOUT_TORCHSCRIPT = """
import sys
import torch, torch.jit

def refuse(*args, **kwargs):
    raise RuntimeError("TorchScript is not available")

for name in ("script", "trace", "trace_module", "load", "save", "freeze", "script_if_tracing"):
    setattr(torch.jit, name, refuse)

# PyTorch's own modules still use these decorators when they are imported; torchmha must not.
def refused_for_torchmha(decorator):
    def checked(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.split(".")[0] == "torchmha":
            raise RuntimeError(f"{caller} uses torch.jit.{decorator.__name__}")
        return decorator(*args, **kwargs)
    return checked

for name in ("unused", "ignore", "export"):
    setattr(torch.jit, name, refused_for_torchmha(getattr(torch.jit, name)))
del torch.jit.unused  # Gone entirely: torchmha's import must not need it.

import torchmha

torch.manual_seed(0)
reference = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
ours = torchmha.MultiHeadAttention(8, 2, batch_first=True).double()
ours.load_state_dict(reference.state_dict())
x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
for need_weights in (True, False):
    out, _ = ours(x, x, x, need_weights=need_weights, is_causal=False)
    expected, _ = reference(x, x, x, need_weights=need_weights)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
textbook = torchmha.TextbookMultiHeadAttention(2, 8).double()
textbook(x, x, x, torch.ones(2, 1, 5, 5, dtype=torch.int64))
cpp = torchmha.cpp.MultiHeadAttention(8, 2)
cpp(x.float(), x.float(), x.float())
exported = torch.export.export(ours, (x.detach(), x.detach(), x.detach()))
torch.testing.assert_close(exported.module()(x, x, x)[0], ours(x, x, x)[0])
print("torchmha works without TorchScript")
"""


def test_torchmha_needs_no_torchscript() -> None:
    """Importing torchmha, its modules' forward and backward, and torch.export call no
    TorchScript API: they work in a process where every such API raises or is gone."""
    result = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", WITHOUT_TORCHSCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning:torchmha"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torchmha works without TorchScript" in result.stdout
