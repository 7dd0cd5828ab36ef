"""The C++ modules themselves, bound with pybind11 and wrapped as ``torch.nn.Module``.

``torchmha.cpp.MultiHeadAttention`` is the very ``torchmha::MultiHeadAttention`` object a
LibTorch program builds: its parameters are the C++ tensors, ``.train()``, ``.eval()`` and
``.to()`` act on the C++ module, and ``state_dict()`` uses PyTorch's names. ``copy.deepcopy``,
``pickle`` and ``torch.save(module)`` rebuild the C++ module from its options and tensors;
``.to("meta")``, ``.to_empty()`` and ``load_state_dict(..., assign=True)`` give the C++ tensors
new data in place.
"""

from typing import Optional

from torch import Tensor
from torch.nn.cpp import OrderedDictWrapper

from torchmha import _C
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


class MultiHeadAttention(_CppModule):
    """The C++ ``torchmha::MultiHeadAttention``; ``torch.nn.MultiheadAttention``'s arguments.

    The keyword-only ``num_kv_heads`` (grouped-query attention), ``rope_theta``, ``rotary_dim``
    and ``rotary_interleaved`` (rotary embeddings) are ``torchmha.MultiHeadAttention``'s, and
    ``forward(..., positions=None)`` takes the query tokens' rotary positions.
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


__all__ = ["MultiHeadAttention", "TextbookMultiHeadAttention"]
