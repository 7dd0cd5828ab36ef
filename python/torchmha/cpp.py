"""The C++ modules themselves, bound with pybind11 and wrapped as ``torch.nn.Module``.

``torchmha.cpp.MultiHeadAttention`` is the very ``torchmha::MultiHeadAttention`` object a
LibTorch program builds: its parameters are the C++ tensors, ``.train()``, ``.eval()`` and
``.to()`` act on the C++ module, and ``state_dict()`` uses PyTorch's names. ``copy.deepcopy``,
``pickle`` and ``torch.save(module)`` rebuild the C++ module from its options and tensors;
``.to("meta")``, ``.to_empty()`` and ``load_state_dict(..., assign=True)`` give the C++ tensors
new data in place.

``torchmha.cpp.KVCache`` is the C++ ``torchmha::KVCache`` the same way: its buffers are the C++
tensors, which the bound module's ``forward(..., kv_cache=cache)`` writes and reads.
"""

from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.cpp import OrderedDictWrapper

from torchmha import _C
from torchmha.kv_cache import CacheSizes
from torchmha.loading import AllOrNothingLoading


class _CppModule(AllOrNothingLoading):
    """An ``nn.Module`` whose parameters and training flag live in a bound C++ module.

    Parameters appear flat, under their dotted state-dict names (``out_proj.weight``), so
    ``state_dict()``, ``load_state_dict()``, ``parameters()``, ``.to()`` and ``zero_grad()`` are
    ``nn.Module``'s own and act on the C++ tensors.
    """

    def __init__(self, cpp_module) -> None:
        # Set before nn.Module.__init__, which assigns `training` (a property over the C++ flag).
        self.cpp_module = cpp_module
        super().__init__()
        self._parameters = OrderedDictWrapper(cpp_module, "_flat_parameters")

    @property  # type: ignore[override]
    def training(self) -> bool:
        return self.cpp_module.training

    @training.setter
    def training(self, mode: bool) -> None:
        self.cpp_module.train(mode)

    def forward(self, *args, **kwargs):
        return self.cpp_module.forward(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # The C++ module keeps its tensors as members, so conversions (.to(), .to("meta"),
        # .to_empty()) replace their data in place, across devices too.
        for parameter in self.parameters():
            _C._replace_data(parameter, fn(parameter.data))
            if parameter.grad is not None:
                _C._replace_data(parameter.grad, fn(parameter.grad.data))
        return self

    def __setattr__(self, name: str, value) -> None:
        parameters = self.__dict__.get("_parameters")
        if isinstance(parameters, OrderedDictWrapper) and name in parameters:
            self._assign_parameter(name, parameters[name], value)
        else:
            super().__setattr__(name, value)

    def _assign_parameter(self, name: str, parameter: Tensor, value) -> None:
        """``module.<name> = tensor`` (and ``load_state_dict(..., assign=True)``): the C++
        parameter takes the tensor's data (its storage, dtype and device) and keeps its own
        ``requires_grad``, as PyTorch's assign keeps it; the C++ module holds it as a member, so
        the parameter stays the same object."""
        owner = type(self).__module__ + "." + type(self).__qualname__
        if value is None:
            raise ValueError(
                f"{owner}: the C++ module cannot drop its parameter `{name}`; build it without "
                "that parameter instead (e.g. bias=False or add_bias_kv=False)"
            )
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{owner}: cannot assign {type(value).__name__} to the parameter `{name}`, "
                "expected a tensor"
            )
        if value.shape != parameter.shape:
            raise ValueError(
                f"{owner}: the parameter `{name}` has shape {list(parameter.shape)}, but the "
                f"tensor assigned has shape {list(value.shape)}"
            )
        _C._replace_data(parameter, value.detach())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # nn.Module would read "out_proj.weight" as a child module's key; here every name is flat.
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, False, missing_keys, unexpected_keys, error_msgs
        )
        if strict:
            own = {prefix + name for name in self._parameters.keys()}
            missing_keys.extend(key for key in own if key not in state_dict)
            unexpected_keys.extend(
                key for key in state_dict if key.startswith(prefix) and key not in own
            )

    def __repr__(self) -> str:
        return self.cpp_module.pretty_print()


def _qualified_name(value: Any) -> str:
    kind = type(value)
    return (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )


class KVCache(CacheSizes, nn.Module):
    """The C++ ``torchmha::KVCache``: the keys and values of earlier tokens, for incremental
    decoding with ``torchmha.cpp.MultiHeadAttention``; ``torchmha.KVCache``'s arguments.

    ``key``, ``value`` (``(batch_size, num_kv_heads, max_seq_len, head_dim)``, keys after their
    rotary embedding) and ``seq_lens`` (int64, ``(batch_size,)``) are the C++ tensors, seen as
    non-persistent buffers: ``.to()`` converts them in place (``seq_lens`` stays int64) and the
    state dict is empty, as ``torchmha.KVCache``'s.

    Args:
        batch_size: sequences decoded side by side.
        num_kv_heads: key/value heads of the attention that uses the cache.
        max_seq_len: positions per sequence (prompt and generated tokens).
        head_dim: features per head.
        dtype: of the keys and values (default: PyTorch's default dtype).
        device: of every tensor of the cache.
    """

    key: Tensor
    value: Tensor
    seq_lens: Tensor

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
    ) -> None:
        device = None if device is None else torch.device(device)
        self._wrap(_C.KVCache(batch_size, num_kv_heads, max_seq_len, head_dim, dtype, device))

    @classmethod
    def _from_cpp(cls, cpp_cache) -> "KVCache":
        """Wraps a bound ``torchmha::KVCache`` (e.g. from the C++ module's ``new_kv_cache``)."""
        cache = cls.__new__(cls)
        cache._wrap(cpp_cache)
        return cache

    def _wrap(self, cpp_cache) -> None:
        self.cpp_cache = cpp_cache
        nn.Module.__init__(self)
        self._buffers = OrderedDictWrapper(cpp_cache, "_buffers")
        # Decoding state, not weights: out of the state dict, as torchmha.KVCache's buffers.
        self._non_persistent_buffers_set = {"key", "value", "seq_lens"}

    def reset(self) -> None:
        """Empties every entry (lengths 0, keys and values zero), in place."""
        self.cpp_cache.reset()

    def reorder(self, indices: Union[Tensor, Sequence[int]]) -> None:
        """Entry ``b`` becomes what entry ``indices[b]`` was (beam search: select and repeat
        entries), in place; ``indices`` has one integer index per entry."""
        self.cpp_cache.reorder(torch.as_tensor(indices, device=self.seq_lens.device))

    def _apply(self, fn, recurse=True):
        # The C++ cache keeps its tensors as members: conversions replace their data in place.
        for buffer in self.buffers():
            _C._replace_data(buffer, fn(buffer))
        return self

    def __repr__(self) -> str:
        return self.cpp_cache.pretty_print()


def _cpp_cache(kv_cache: Any):
    """The bound ``torchmha::KVCache`` of a ``torchmha.cpp.KVCache`` (``None`` for none)."""
    if kv_cache is None:
        return None
    if not isinstance(kv_cache, KVCache):
        raise TypeError(
            "torchmha.cpp.MultiHeadAttention: `kv_cache` must be a torchmha.cpp.KVCache (from "
            f"its new_kv_cache), got {_qualified_name(kv_cache)}"
        )
    return kv_cache.cpp_cache


class MultiHeadAttention(_CppModule):
    """The C++ ``torchmha::MultiHeadAttention``; ``torch.nn.MultiheadAttention``'s arguments.

    The keyword-only ``num_kv_heads`` (grouped-query attention), ``rope_theta``, ``rotary_dim``
    and ``rotary_interleaved`` (rotary embeddings) are ``torchmha.MultiHeadAttention``'s, and
    ``forward(..., positions=None, kv_cache=None)`` takes the query tokens' rotary positions and
    a ``torchmha.cpp.KVCache`` (from :meth:`new_kv_cache`) to decode with.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        *,
        num_kv_heads: Optional[int] = None,
        rope_theta: Optional[float] = None,
        rotary_dim: Optional[int] = None,
        rotary_interleaved: bool = False,
    ) -> None:
        super().__init__(
            _C.MultiHeadAttention(
                embed_dim,
                num_heads,
                dropout,
                bias,
                add_bias_kv,
                add_zero_attn,
                kdim,
                vdim,
                batch_first,
                num_kv_heads=num_kv_heads,
                rope_theta=rope_theta,
                rotary_dim=rotary_dim,
                rotary_interleaved=rotary_interleaved,
            )
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        positions: Optional[Tensor] = None,
        kv_cache: Optional[KVCache] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``torchmha.MultiHeadAttention.forward``'s arguments; ``kv_cache`` is a
        ``torchmha.cpp.KVCache`` (run it without autograd, e.g. under ``torch.no_grad()``)."""
        return self.cpp_module.forward(
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
            positions,
            _cpp_cache(kv_cache),
        )

    def new_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
    ) -> KVCache:
        """An empty ``torchmha.cpp.KVCache`` for this module's key/value heads: ``batch_size``
        sequences of up to ``max_seq_len`` tokens, in the dtype and on the device of the
        module's weights unless given (the C++ module's ``new_kv_cache``)."""
        device = None if device is None else torch.device(device)
        return KVCache._from_cpp(
            self.cpp_module.new_kv_cache(batch_size, max_seq_len, dtype, device)
        )

    @property
    def embed_dim(self) -> int:
        return self.cpp_module.embed_dim

    @property
    def num_heads(self) -> int:
        return self.cpp_module.num_heads

    @property
    def batch_first(self) -> bool:
        return self.cpp_module.batch_first

    @property
    def head_dim(self) -> int:
        return self.cpp_module.head_dim

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: the option, or ``num_heads`` when it was not given."""
        return self.cpp_module.num_kv_heads

    @property
    def rope_theta(self) -> Optional[float]:
        return self.cpp_module.rope_theta

    @property
    def rotary_dim(self) -> Optional[int]:
        """As given: ``None`` rotates all of ``head_dim`` (with ``rope_theta``)."""
        return self.cpp_module.rotary_dim

    @property
    def rotary_interleaved(self) -> bool:
        return self.cpp_module.rotary_interleaved


class TextbookMultiHeadAttention(_CppModule):
    """The C++ ``torchmha::TextbookMultiHeadAttention``: the chapter's ``(h, d_model, dropout)``."""

    def __init__(self, h: int, d_model: int, dropout: float = 0.1) -> None:
        super().__init__(_C.TextbookMultiHeadAttention(h, d_model, dropout))

    @property
    def attn(self):
        """Per-head attention probabilities of the last call, ``(B, h, L, S)``."""
        return self.cpp_module.attn


__all__ = ["KVCache", "MultiHeadAttention", "TextbookMultiHeadAttention"]
