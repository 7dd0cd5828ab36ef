"""``torchmha.MultiHeadAttention``: a drop-in for ``torch.nn.MultiheadAttention``."""

import math
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_

from torchmha.kv_cache import KVCache
from torchmha.loading import AllOrNothingLoading
from torchmha.ops import multi_head_attention

# TorchScript is deprecated upstream: where a PyTorch no longer has it, eager mode, torch.compile
# and torch.export work unchanged. TorchScript maps these objects to its own builtins.
_is_scripting = getattr(torch.jit, "is_scripting", lambda: False)
_unused_by_torchscript = getattr(torch.jit, "unused", lambda function: function)


class MultiHeadAttention(AllOrNothingLoading):
    """Multi-head attention computed by the C++ op ``torch.ops.torchmha.multi_head_attention``.

    Same constructor, parameters (``in_proj_weight`` or ``q/k/v_proj_weight``,
    ``in_proj_bias``, ``out_proj``, ``bias_k``, ``bias_v``), ``state_dict`` keys and
    ``forward`` as :class:`torch.nn.MultiheadAttention`, so either module's state dict loads
    into the other. Each weight is read as PyTorch's module reads it, so a weight that is
    parametrized, pruned, a buffer or a plain tensor attribute is used as it is there.
    Differences, each deliberate: a query whose keys are all masked gets a zero
    attention output (before ``out_proj``) and zero weights instead of NaN, and
    ``is_causal=True`` without ``attn_mask`` is causal attention.

    Beyond ``torch.nn.MultiheadAttention`` (keyword-only; the defaults keep it a drop-in):
    grouped-query attention with ``num_kv_heads`` key/value heads, whose key and value
    projections then have ``kv_dim = num_kv_heads * head_dim`` rows (``in_proj_weight`` is
    ``(embed_dim + 2 * kv_dim, embed_dim)``), and rotary position embeddings on queries and keys
    with ``rope_theta``, as decoder models (Llama, Mistral, GPT-NeoX, GPT-J) use them.

    Args:
        embed_dim: total dimension of the model.
        num_heads: number of parallel heads; must divide ``embed_dim``.
        dropout: dropout probability on the attention probabilities (training only).
        bias: whether the input and output projections have biases.
        add_bias_kv: append learned biases to the key and value sequences.
        add_zero_attn: append a zero position to the key and value sequences.
        kdim: features in ``key`` (default ``embed_dim``).
        vdim: features in ``value`` (default ``embed_dim``).
        batch_first: inputs and outputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        num_kv_heads: key/value heads (``None``: ``num_heads``; must divide it; 1 is
            multi-query attention). Query head ``h`` uses key/value head
            ``h // (num_heads // num_kv_heads)``.
        rope_theta: base of rotary position embeddings on queries and keys (``None``: none).
        rotary_dim: leading features of each head that rotate (even; ``None``: all), as
            GPT-NeoX's partial rotary embeddings.
        rotary_interleaved: pair features ``2i`` and ``2i + 1`` (GPT-J) instead of ``i`` and
            ``i + rotary_dim // 2`` (Llama, GPT-NeoX).
    """

    __constants__ = ["batch_first"]

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
        device=None,
        dtype=None,
        *,
        num_kv_heads: Optional[int] = None,
        rope_theta: Optional[float] = None,
        rotary_dim: Optional[int] = None,
        rotary_interleaved: bool = False,
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                "embed_dim and num_heads must be greater than 0, "
                f"got embed_dim={embed_dim} and num_heads={num_heads} instead"
            )
        if 3 * embed_dim > torch.iinfo(torch.int64).max:
            raise ValueError(f"embed_dim={embed_dim} is too large: 3 * embed_dim must fit in int64")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        _check_grouped_rotary(
            num_heads,
            embed_dim // num_heads,
            num_kv_heads,
            rope_theta,
            rotary_dim,
            rotary_interleaved,
        )
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        self.add_zero_attn = add_zero_attn
        self.num_kv_heads = num_kv_heads if num_kv_heads is not None else num_heads
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.rotary_dim = rotary_dim
        self.rotary_interleaved = rotary_interleaved
        kv_dim = self.num_kv_heads * self.head_dim

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(
                torch.empty((embed_dim + 2 * kv_dim, embed_dim), **factory_kwargs)
            )
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = nn.Parameter(torch.empty((kv_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = nn.Parameter(torch.empty((kv_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(embed_dim + 2 * kv_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, kv_dim), **factory_kwargs))
            self.bias_v = nn.Parameter(torch.empty((1, 1, kv_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The same initialisation as torch.nn.MultiheadAttention.
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

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
        kv_cache: Optional[Any] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Attend from ``query`` to ``key``/``value``, as ``torch.nn.MultiheadAttention`` does.

        ``positions`` (integers, ``(L,)`` or ``(N, L)``; rotary embeddings only) places the query
        tokens, which the keys share, e.g. for left-padded batches; by default queries and keys
        are at ``0, 1, 2, ...``.

        ``kv_cache`` (a :class:`torchmha.KVCache`, e.g. from :meth:`new_kv_cache`; self-attention,
        eager and compiled, not TorchScript): ``query``, ``key`` and ``value`` are the new tokens.
        Their keys and values are written into the cache at each entry's length, then the queries
        attend over everything cached for their entry (with ``is_causal=True``, new token ``i`` of
        an entry at length ``p`` sees positions ``<= p + i``); rotary positions follow the cache.
        A bool ``key_padding_mask`` over the new tokens (right padding, for prompts of different
        lengths) advances each entry by its real tokens only. Weights, if asked for, are over the
        cache's ``max_seq_len`` positions, zero beyond each entry's length. Run it without
        autograd (``torch.no_grad()`` or ``torch.inference_mode()``).

        Returns ``(attn_output, attn_output_weights)``; the weights are ``None`` unless
        ``need_weights``, averaged over heads unless ``average_attn_weights=False`` (then one
        per query head).
        """
        weights = self._attribute_weights() if _is_scripting() else self._registered_weights()
        cache: List[Optional[Tensor]] = [None, None, None]
        if not _is_scripting():
            if kv_cache is not None:
                cache = self._cache_tensors(kv_cache)
        elif kv_cache is not None:
            # TorchScript cannot hold a KVCache module: refuse rather than ignore it.
            raise RuntimeError(
                "torchmha.MultiHeadAttention: `kv_cache` is not supported under TorchScript; "
                "use eager mode, torch.compile or torch.export"
            )
        return multi_head_attention(
            query,
            key,
            value,
            self.num_heads,
            in_proj_weight=weights[0],
            in_proj_bias=weights[1],
            out_proj_weight=weights[2],
            out_proj_bias=weights[3],
            q_proj_weight=weights[4],
            k_proj_weight=weights[5],
            v_proj_weight=weights[6],
            bias_k=weights[7],
            bias_v=weights[8],
            add_zero_attn=self.add_zero_attn,
            dropout_p=self.dropout,
            training=self.training,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=need_weights,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
            batch_first=self.batch_first,
            num_kv_heads=self.num_kv_heads,
            rope_theta=self.rope_theta,
            rotary_dim=self.rotary_dim,
            rotary_interleaved=self.rotary_interleaved,
            positions=positions,
            cache_key=cache[0],
            cache_value=cache[1],
            cache_lengths=cache[2],
        )

    @_unused_by_torchscript
    def _cache_tensors(self, kv_cache: Any) -> List[Optional[Tensor]]:
        """The op's cache arguments: the cache's keys, values and lengths."""
        if not isinstance(kv_cache, KVCache):
            kind = type(kv_cache)
            # Qualified, so that torchmha.cpp.KVCache (the C++ module's) reads apart from ours.
            name = kind.__qualname__
            if kind.__module__ != "builtins":
                name = f"{kind.__module__}.{name}"
            raise TypeError(
                f"torchmha.MultiHeadAttention: `kv_cache` must be a torchmha.KVCache, got {name}"
            )
        return [kv_cache.key, kv_cache.value, kv_cache.seq_lens]

    def new_kv_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
    ) -> KVCache:
        """An empty :class:`torchmha.KVCache` for this module's key/value heads: ``batch_size``
        sequences of up to ``max_seq_len`` tokens, in the dtype and on the device of the module's
        weights unless given."""
        weight = self.in_proj_weight if self._qkv_same_embed_dim else self.k_proj_weight
        return KVCache(
            batch_size,
            self.num_kv_heads,
            max_seq_len,
            self.head_dim,
            dtype=weight.dtype if dtype is None else dtype,
            device=weight.device if device is None else device,
        )

    def _attribute_weights(
        self,
    ) -> Tuple[
        Optional[Tensor],
        Optional[Tensor],
        Tensor,
        Optional[Tensor],
        Optional[Tensor],
        Optional[Tensor],
        Optional[Tensor],
        Optional[Tensor],
        Optional[Tensor],
    ]:
        """The op's weight arguments, in its order, as attributes (what TorchScript compiles)."""
        return (
            self.in_proj_weight,
            self.in_proj_bias,
            self.out_proj.weight,
            self.out_proj.bias,
            self.q_proj_weight,
            self.k_proj_weight,
            self.v_proj_weight,
            self.bias_k,
            self.bias_v,
        )

    @_unused_by_torchscript
    def _registered_weights(self) -> Tuple[Optional[Tensor], ...]:
        """The op's weight arguments, read from the registries when that equals reading the
        attributes (nn.Module.__getattr__ is slow per name), else read as attributes."""
        # A parametrization swaps in a subclass with properties; a subclass may define its own.
        # The compilers trace attributes best and once, so they get no shortcut.
        if (
            type(self) is MultiHeadAttention
            and type(self._modules["out_proj"]) is nn.Linear
            and not torch.compiler.is_compiling()
        ):
            own = self._parameters
            out_proj = self._modules["out_proj"]._parameters
            # nn.Module keeps a name in one place only: pruned weights, buffers and plain tensors
            # are not in _parameters (KeyError); bias_k/bias_v without add_bias_kv are None in
            # __dict__, and a tensor put there later is what the attribute reads.
            attributes = self.__dict__
            try:
                return (
                    own["in_proj_weight"],
                    own["in_proj_bias"],
                    out_proj["weight"],
                    out_proj["bias"],
                    own["q_proj_weight"],
                    own["k_proj_weight"],
                    own["v_proj_weight"],
                    own["bias_k"] if "bias_k" in own else attributes["bias_k"],
                    own["bias_v"] if "bias_v" in own else attributes["bias_v"],
                )
            except KeyError:
                pass
        return self._attribute_weights()

    def extra_repr(self) -> str:
        text = (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
            f"batch_first={self.batch_first}"
        )
        if self.num_kv_heads != self.num_heads:
            text += f", num_kv_heads={self.num_kv_heads}"
        if self.rope_theta is not None:
            text += f", rope_theta={self.rope_theta}"
            if self.rotary_dim is not None:
                text += f", rotary_dim={self.rotary_dim}"
            if self.rotary_interleaved:
                text += ", rotary_interleaved=True"
        return text


def _check_grouped_rotary(
    num_heads: int,
    head_dim: int,
    num_kv_heads: Optional[int],
    rope_theta: Optional[float],
    rotary_dim: Optional[int],
    rotary_interleaved: bool,
) -> None:
    """Refuses grouped-query and rotary options that the op would refuse, at construction."""
    if num_kv_heads is not None and not (
        0 < num_kv_heads <= num_heads and num_heads % num_kv_heads == 0
    ):
        raise ValueError(
            f"num_kv_heads must divide num_heads {num_heads} (1 <= num_kv_heads <= num_heads), "
            f"got {num_kv_heads}"
        )
    if rope_theta is None:
        if rotary_dim is not None or rotary_interleaved:
            name = "rotary_dim" if rotary_dim is not None else "rotary_interleaved"
            raise ValueError(f"{name} applies to rotary embeddings, which need rope_theta")
        return
    if not math.isfinite(rope_theta) or rope_theta <= 0:
        raise ValueError(f"rope_theta must be positive and finite, got {rope_theta}")
    if rotary_dim is None:
        if head_dim % 2 != 0:
            raise ValueError(
                f"rotary embeddings rotate pairs of features, but head_dim {head_dim} is odd: "
                "give an even rotary_dim"
            )
    elif not (0 < rotary_dim <= head_dim and rotary_dim % 2 == 0):
        raise ValueError(
            f"rotary_dim must be even and in [2, head_dim] = [2, {head_dim}], got {rotary_dim}"
        )
