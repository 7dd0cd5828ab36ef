"""Every weight of the Python module, however it is held, reaches the op as PyTorch's does.

``torch.nn.MultiheadAttention`` reads its weights as attributes, so a weight that is
parametrized (``torch.nn.utils.parametrize``), pruned (``torch.nn.utils.prune``: ``X_orig``, a
``X_mask`` buffer and a plain attribute a hook recomputes), a buffer or a plain tensor attribute
is honoured. Each form of each weight is applied to PyTorch's module and to torchmha's, loaded
with the same state, and their outputs, weights and gradients compared.
"""

from typing import Any, Callable, Dict, Sequence, Tuple

import pytest
import torch
from conftest import assert_parity, make_mha_pair, sequence_first
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

EMBED_DIM, NUM_HEADS, BATCH, KDIM, VDIM = 8, 2, 3, 5, 6

# The configuration that owns each weight: packed or separate projections, with bias_k/bias_v.
PACKED = {"add_bias_kv": True}
SEPARATE = {"add_bias_kv": True, "kdim": KDIM, "vdim": VDIM}
WEIGHTS: Dict[str, Dict[str, Any]] = {
    "in_proj_weight": PACKED,
    "in_proj_bias": PACKED,
    "q_proj_weight": SEPARATE,
    "k_proj_weight": SEPARATE,
    "v_proj_weight": SEPARATE,
    "out_proj.weight": PACKED,
    "out_proj.bias": PACKED,
    "bias_k": PACKED,
    "bias_v": PACKED,
}


class AffineParametrization(nn.Module):
    """A parametrization whose value differs from the stored tensor, so reading either shows."""

    def forward(self, tensor: Tensor) -> Tensor:
        return tensor * 1.5 + 0.25


def parametrized(owner: nn.Module, name: str, mask: Tensor) -> None:
    parametrize.register_parametrization(owner, name, AffineParametrization())


def pruned(owner: nn.Module, name: str, mask: Tensor) -> None:
    prune.custom_from_mask(owner, name, mask)


def as_buffer(owner: nn.Module, name: str, mask: Tensor) -> None:
    value = getattr(owner, name).detach().clone()
    delattr(owner, name)
    owner.register_buffer(name, value)


def as_plain_attribute(owner: nn.Module, name: str, mask: Tensor) -> None:
    value = getattr(owner, name).detach().clone()
    delattr(owner, name)
    setattr(owner, name, value)  # No longer a registered name: nn.Module keeps it in __dict__.
    assert name in owner.__dict__


FORMS: Dict[str, Callable[[nn.Module, str, Tensor], None]] = {
    "parametrized": parametrized,
    "pruned": pruned,
    "buffer": as_buffer,
    "plain_attribute": as_plain_attribute,
}


def apply_form(modules: Sequence[nn.Module], weights: Sequence[str], form: str) -> None:
    """Hold each of ``weights`` in ``form`` in every module (the same pruning mask in each)."""
    for weight in weights:
        owner_name, _, name = weight.rpartition(".")
        mask = torch.rand_like(modules[0].get_parameter(weight)) < 0.5
        for module in modules:
            owner = module.get_submodule(owner_name)
            FORMS[form](owner, name, mask)
            # The weight has left the registry the module's fast path reads.
            assert name not in owner._parameters, (form, weight)


def inputs(config: Dict[str, Any]) -> Tuple[Tensor, Tensor, Tensor]:
    query = sequence_first(BATCH, 4, EMBED_DIM, False, torch.float64)
    key = sequence_first(BATCH, 6, config.get("kdim", EMBED_DIM), False, torch.float64)
    value = sequence_first(BATCH, 6, config.get("vdim", EMBED_DIM), False, torch.float64)
    return query, key, value


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("weight", sorted(WEIGHTS))
def test_each_weight_in_each_form_matches_pytorch(
    weight: str, form: str, need_weights: bool
) -> None:
    """Outputs, attention weights and every gradient (inputs, and the parameters that remain,
    e.g. ``parametrizations.X.original`` or ``X_orig``) equal PyTorch's."""
    config = WEIGHTS[weight]
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, torch.float64, **config)
    apply_form((reference, candidate), [weight], form)
    assert_parity(reference, candidate, inputs(config), need_weights=need_weights)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("config", [PACKED, SEPARATE], ids=["packed", "separate"])
def test_every_weight_in_one_form_matches_pytorch(config: Dict[str, Any], form: str) -> None:
    """All weights of a module held in one form at once (``bias_k`` and ``bias_v`` together)."""
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, torch.float64, **config)
    weights = [name for name, _ in reference.named_parameters()]
    apply_form((reference, candidate), weights, form)
    assert_parity(reference, candidate, inputs(config))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_bias_k_and_bias_v_together_in_one_form_match_pytorch(form: str) -> None:
    """``bias_k`` and ``bias_v`` both moved out of ``_parameters``, the other weights left there."""
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, torch.float64, **PACKED)
    apply_form((reference, candidate), ["bias_k", "bias_v"], form)
    assert_parity(reference, candidate, inputs(PACKED))


def test_parametrization_follows_the_original_after_an_update() -> None:
    """A parametrized ``bias_k`` is read at each call: changing the original changes the output
    as it does in PyTorch's module."""
    reference, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, torch.float64, **PACKED)
    apply_form((reference, candidate), ["bias_k"], "parametrized")
    for module in (reference, candidate):
        with torch.no_grad():
            module.parametrizations.bias_k.original.add_(1.0)
    assert_parity(reference, candidate, inputs(PACKED))


def test_missing_bias_v_is_refused_with_bias_k_held_as_buffer() -> None:
    """``bias_k`` as a buffer and ``bias_v`` removed: the op's message, as for the arguments."""
    _, candidate = make_mha_pair(EMBED_DIM, NUM_HEADS, torch.float64, **PACKED)
    apply_form((candidate,), ["bias_k"], "buffer")
    del candidate.bias_v
    candidate.bias_v = None
    with pytest.raises(RuntimeError, match="`bias_k` and `bias_v` go together"):
        candidate(*inputs(PACKED))
