"""Checkpoints with separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` linear layers.

Llama-family checkpoints (Llama, Mistral, Qwen2, ...) keep one ``nn.Linear`` per projection;
torchmha keeps ``torch.nn.MultiheadAttention``'s names (``in_proj_weight`` or
``q/k/v_proj_weight``, ``in_proj_bias``, ``out_proj``). :func:`load_separate_projections` moves
such weights into a torchmha module and :func:`separate_projections_state_dict` gives them back.
"""

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["load_separate_projections", "separate_projections_state_dict"]

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
# add_bias_kv's learned key/value rows have no counterpart in a Llama-style checkpoint; they
# travel under torchmha's own names.
_EXTRA_KEYS = ("bias_k", "bias_v")


class _Layout:
    """The shapes a module's state dict has, read from the module itself (so it fits both the
    Python and the C++ module, whatever ``num_kv_heads``, ``kdim`` and ``vdim`` they were built
    with)."""

    def __init__(self, module: nn.Module, owner: str) -> None:
        shapes = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
        if "out_proj.weight" not in shapes:
            raise TypeError(
                f"{owner}: `module` must be a torchmha.MultiHeadAttention or "
                f"torchmha.cpp.MultiHeadAttention, got {type(module).__name__} (its state dict "
                "has no `out_proj.weight`)"
            )
        self.shapes = shapes
        self.embed_dim = shapes["out_proj.weight"][0]
        self.packed = "in_proj_weight" in shapes
        self.has_bias = "in_proj_bias" in shapes
        self.extra_keys = [name for name in _EXTRA_KEYS if name in shapes]
        if self.packed:
            self.kv_dim = (shapes["in_proj_weight"][0] - self.embed_dim) // 2
            input_dims = [self.embed_dim] * 3
        else:
            self.kv_dim = shapes["k_proj_weight"][0]
            input_dims = [shapes[f"{name}_weight"][1] for name in _PROJECTIONS]
        output_dims = [self.embed_dim, self.kv_dim, self.kv_dim]
        # (rows, columns) of q_proj, k_proj and v_proj, as nn.Linear(in, out).weight has them.
        self.projection_shapes = {
            name: (rows, columns)
            for name, rows, columns in zip(_PROJECTIONS, output_dims, input_dims)
        }
        num_heads = getattr(module, "num_heads", None)
        self.head_dim: Optional[int] = self.embed_dim // num_heads if num_heads else None
        self.num_kv_heads: Optional[int] = getattr(module, "num_kv_heads", None) or (
            self.kv_dim // self.head_dim if self.head_dim else None
        )

    def described(self, name: str) -> str:
        """Where a projection's expected shape comes from, for error messages."""
        rows, columns = self.projection_shapes[name]
        if name == "q_proj":
            return f"(embed_dim={rows} rows, {columns} input features)"
        return (
            f"(num_kv_heads={self.num_kv_heads} * head_dim={self.head_dim} = {rows} rows, "
            f"{columns} input features)"
        )


def _tensor(state_dict: Mapping[str, object], key: str, owner: str) -> Tensor:
    value = state_dict[key]
    if not isinstance(value, Tensor):
        raise TypeError(f"{owner}: `{key}` must be a tensor, got {type(value).__name__}")
    return value


def _check_keys(state_dict: Mapping[str, object], prefix: str, layout: _Layout, owner: str) -> None:
    """Every required key present, and no key under ``prefix`` that the module cannot hold."""
    required = [f"{prefix}{name}.weight" for name in (*_PROJECTIONS, "o_proj")]
    required += [f"{prefix}{name}" for name in layout.extra_keys]
    missing = [key for key in required if key not in state_dict]
    if missing:
        found = sorted(key for key in state_dict if key.startswith(prefix))
        raise RuntimeError(
            f"{owner}: the state dict has no {', '.join(f'`{key}`' for key in missing)} "
            f"(keys found under prefix {prefix!r}: {found})"
        )
    known = set(required) | {f"{prefix}{name}.bias" for name in (*_PROJECTIONS, "o_proj")}
    unexpected = sorted(k for k in state_dict if k.startswith(prefix) and k not in known)
    if unexpected:
        # A weight left behind (a norm, a rotary buffer) would silently change the results.
        raise RuntimeError(
            f"{owner}: unexpected key(s) {', '.join(f'`{key}`' for key in unexpected)} under "
            f"prefix {prefix!r}; the module holds only q_proj, k_proj, v_proj and o_proj "
            "(+ bias_k/bias_v with add_bias_kv); pass the attention block's own prefix"
        )


def _checked_weight(
    state_dict: Mapping[str, object],
    prefix: str,
    name: str,
    expected: Tuple[int, int],
    described: str,
    owner: str,
) -> Tensor:
    key = f"{prefix}{name}.weight"
    weight = _tensor(state_dict, key, owner)
    if tuple(weight.shape) != expected:
        raise RuntimeError(
            f"{owner}: `{key}` has shape {list(weight.shape)}, but the module expects "
            f"{list(expected)} {described}"
        )
    return weight


def _bias_or_zeros(
    state_dict: Mapping[str, object], prefix: str, name: str, like: Tensor, owner: str
) -> Tensor:
    """The checkpoint's bias, or zeros where it has none (a zero bias computes the same)."""
    key = f"{prefix}{name}.bias"
    if key not in state_dict:
        return like.new_zeros(like.shape[0])
    bias = _tensor(state_dict, key, owner)
    if tuple(bias.shape) != (like.shape[0],):
        raise RuntimeError(
            f"{owner}: `{key}` has shape {list(bias.shape)}, but `{prefix}{name}.weight` has "
            f"{like.shape[0]} rows, so the module expects [{like.shape[0]}]"
        )
    return bias


def _refuse_biases(state_dict: Mapping[str, object], prefix: str, owner: str) -> None:
    given = [f"{prefix}{name}.bias" for name in (*_PROJECTIONS, "o_proj")]
    given = [key for key in given if key in state_dict]
    if given:
        raise RuntimeError(
            f"{owner}: the state dict has {', '.join(f'`{key}`' for key in given)}, but the "
            "module was built with bias=False; build it with bias=True"
        )


def load_separate_projections(
    module: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = ""
) -> None:
    """Load a checkpoint with separate ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linear layers.

    Reads ``{prefix}q_proj.weight``, ``{prefix}k_proj.weight``, ``{prefix}v_proj.weight``,
    ``{prefix}o_proj.weight`` and, when present, their ``.bias``, as the ``nn.Linear`` layers of
    Hugging Face's ``LlamaAttention`` (and Mistral, Qwen2, GPT-NeoX-style converted, ...) hold
    them, and loads them into ``module`` with ``module.load_state_dict``: into ``in_proj_weight``
    (the three stacked, ``(embed_dim + 2 * kv_dim, embed_dim)``) or into ``q_proj_weight``,
    ``k_proj_weight`` and ``v_proj_weight``, whichever the module has, and ``out_proj``.

    ``module`` is a :class:`torchmha.MultiHeadAttention` or a
    :class:`torchmha.cpp.MultiHeadAttention` built with the checkpoint's shapes: ``embed_dim`` =
    the hidden size, ``num_heads``, ``num_kv_heads`` = the key/value heads (``k_proj`` and
    ``v_proj`` have ``num_kv_heads * head_dim`` rows), and the rotary options of the model the
    checkpoint comes from (Hugging Face's Llama-family weights rotate halves:
    ``rotary_interleaved=False``). The state dict carries no such options.

    Biases: a module built with ``bias=True`` takes each bias the checkpoint has and a zero bias
    for each one it lacks, which computes exactly what the checkpoint's model does: Qwen2-style
    checkpoints (``q/k/v_proj.bias`` but no ``o_proj.bias``) load with a zero
    ``out_proj.bias``, Llama ones (no bias at all) with all biases zero. A module built with
    ``bias=False`` refuses a checkpoint that has any bias. A module with ``add_bias_kv`` also
    needs ``{prefix}bias_k`` and ``{prefix}bias_v`` (as :func:`separate_projections_state_dict`
    writes them).

    Args:
        module: the torchmha module to load into.
        state_dict: the checkpoint (other keys are ignored unless they start with ``prefix``).
        prefix: the attention block's prefix in ``state_dict``, e.g.
            ``"model.layers.0.self_attn."``.

    Raises:
        RuntimeError: a key is missing, a key under ``prefix`` is not one of the above, or a
            shape does not fit the module (the message names the key, the expected and the
            given shape); the module is left unchanged.
        TypeError: ``module`` is not a torchmha attention module, or a value is not a tensor.
    """
    owner = "torchmha.load_separate_projections"
    layout = _Layout(module, owner)
    _check_keys(state_dict, prefix, layout, owner)
    weights = {
        name: _checked_weight(
            state_dict, prefix, name, layout.projection_shapes[name], layout.described(name), owner
        )
        for name in _PROJECTIONS
    }
    out_weight = _checked_weight(
        state_dict,
        prefix,
        "o_proj",
        layout.shapes["out_proj.weight"],
        f"(embed_dim={layout.embed_dim} rows and columns)",
        owner,
    )
    converted: Dict[str, Tensor] = {"out_proj.weight": out_weight}
    if layout.packed:
        converted["in_proj_weight"] = torch.cat([weights[name] for name in _PROJECTIONS])
    else:
        converted.update({f"{name}_weight": weights[name] for name in _PROJECTIONS})
    if layout.has_bias:
        converted["in_proj_bias"] = torch.cat(
            [
                _bias_or_zeros(state_dict, prefix, name, weights[name], owner)
                for name in _PROJECTIONS
            ]
        )
        converted["out_proj.bias"] = _bias_or_zeros(state_dict, prefix, "o_proj", out_weight, owner)
    else:
        _refuse_biases(state_dict, prefix, owner)
    for name in layout.extra_keys:
        converted[name] = _tensor(state_dict, f"{prefix}{name}", owner)
    # All-or-nothing: torchmha's modules restore every tensor if any key fails to load.
    module.load_state_dict(converted)


def separate_projections_state_dict(module: nn.Module, prefix: str = "") -> Dict[str, Tensor]:
    """The way back: ``module``'s weights as separate ``q/k/v/o_proj`` linear layers.

    Returns ``{prefix}q_proj.weight``, ``{prefix}k_proj.weight``, ``{prefix}v_proj.weight``,
    ``{prefix}o_proj.weight``, their ``.bias`` when the module has biases (``bias=True``), and
    ``{prefix}bias_k``/``{prefix}bias_v`` when it has them (``add_bias_kv``): the layout of
    Hugging Face's ``LlamaAttention`` state dict, which
    :func:`load_separate_projections` reads. The tensors are detached copies that share no
    memory with each other or with the module (so ``safetensors`` can save them).
    """
    owner = "torchmha.separate_projections_state_dict"
    layout = _Layout(module, owner)
    state = module.state_dict()
    split_sizes: List[int] = [layout.embed_dim, layout.kv_dim, layout.kv_dim]
    if layout.packed:
        weights = state["in_proj_weight"].split(split_sizes)
    else:
        weights = tuple(state[f"{name}_weight"] for name in _PROJECTIONS)
    result: Dict[str, Tensor] = {}
    for name, weight in zip(_PROJECTIONS, weights):
        result[f"{prefix}{name}.weight"] = weight
    result[f"{prefix}o_proj.weight"] = state["out_proj.weight"]
    if layout.has_bias:
        for name, bias in zip(_PROJECTIONS, state["in_proj_bias"].split(split_sizes)):
            result[f"{prefix}{name}.bias"] = bias
        result[f"{prefix}o_proj.bias"] = state["out_proj.bias"]
    for name in layout.extra_keys:
        result[f"{prefix}{name}"] = state[name]
    return {key: tensor.detach().clone() for key, tensor in result.items()}
