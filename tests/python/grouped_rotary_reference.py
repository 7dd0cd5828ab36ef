"""A reference for grouped-query attention and rotary embeddings built on PyTorch's own function.

``GroupedRotaryAttention`` holds torchmha's parameters (same names and shapes), projects the
inputs with ``num_kv_heads`` key/value heads, rotates queries and keys, and repeats each
key/value head for its group of query heads, in plain tensor code written from the definitions.
Everything else (masks, ``is_causal``, ``bias_k``/``bias_v``, the zero key, dropout, softmax,
the weights and ``out_proj``) is ``torch.nn.functional.multi_head_attention_forward``'s, called
with identity input projections. With neither feature it is ``torch.nn.MultiheadAttention``.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rotary(
    heads: Tensor, positions: Tensor, theta: float, rotary_dim: int, interleaved: bool
) -> Tensor:
    """``heads`` (N, L, H, D) with its first ``rotary_dim`` features of each head rotated:
    the pair (a, b) of frequency ``theta ** (-2i / rotary_dim)`` becomes
    (a cos - b sin, b cos + a sin) at angle ``position * frequency``. Pairs are features
    (2i, 2i + 1) when ``interleaved``, else (i, i + rotary_dim / 2). ``positions``: (L) or (N, L).
    """
    half = rotary_dim // 2
    frequencies = theta ** (
        -torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=heads.device) / rotary_dim
    )
    angles = positions.to(torch.float64)[..., None] * frequencies  # (L, half) or (N, L, half)
    if angles.dim() == 2:
        angles = angles[None]
    cos = angles.cos()[:, :, None, :].to(heads.dtype)  # (N or 1, L, 1, half)
    sin = angles.sin()[:, :, None, :].to(heads.dtype)
    rotating, passing = heads[..., :rotary_dim], heads[..., rotary_dim:]
    if interleaved:
        first, second = rotating[..., 0::2], rotating[..., 1::2]
    else:
        first, second = rotating[..., :half], rotating[..., half:]
    new_first = first * cos - second * sin
    new_second = second * cos + first * sin
    if interleaved:
        rotated = torch.stack([new_first, new_second], dim=-1).flatten(-2)
    else:
        rotated = torch.cat([new_first, new_second], dim=-1)
    return torch.cat([rotated, passing], dim=-1)


class GroupedRotaryAttention(nn.Module):
    """torchmha's options and parameters, computed as described in the module docstring."""

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
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_dim = self.num_kv_heads * self.head_dim
        self.rope_theta, self.rotary_interleaved = rope_theta, rotary_interleaved
        self.rotary_dim = rotary_dim or self.head_dim
        self.dropout, self.add_zero_attn, self.batch_first = dropout, add_zero_attn, batch_first
        kdim, vdim = kdim or embed_dim, vdim or embed_dim
        packed = kdim == embed_dim and vdim == embed_dim
        rows = embed_dim + 2 * self.kv_dim
        empty = lambda *shape: nn.Parameter(torch.randn(*shape, **factory))  # noqa: E731
        self.in_proj_weight = empty(rows, embed_dim) if packed else None
        self.q_proj_weight = None if packed else empty(embed_dim, embed_dim)
        self.k_proj_weight = None if packed else empty(self.kv_dim, kdim)
        self.v_proj_weight = None if packed else empty(self.kv_dim, vdim)
        self.in_proj_bias = empty(rows) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k = empty(1, 1, self.kv_dim) if add_bias_kv else None
        self.bias_v = empty(1, 1, self.kv_dim) if add_bias_kv else None

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q, k, v of (N, length, features) inputs, before rotation and repetition."""
        splits = [self.embed_dim, self.kv_dim, self.kv_dim]
        biases = [None] * 3 if self.in_proj_bias is None else self.in_proj_bias.split(splits)
        if self.in_proj_weight is not None:
            weights = self.in_proj_weight.split(splits)
        else:
            weights = [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]
        return tuple(  # type: ignore[return-value]
            F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases)
        )

    def _repeat(self, tensor: Tensor) -> Tensor:
        """(..., kv_heads * D) -> (..., heads * D), key/value head j serving query heads
        j * group .. (j + 1) * group - 1."""
        group = self.num_heads // self.num_kv_heads
        heads = tensor.unflatten(-1, (self.num_kv_heads, self.head_dim))
        return heads.repeat_interleave(group, dim=-2).flatten(-2)

    def _rotate(self, tensor: Tensor, heads: int, positions: Tensor) -> Tensor:
        if self.rope_theta is None:
            return tensor
        split = tensor.unflatten(-1, (heads, self.head_dim))
        rotated = rotary(
            split, positions, self.rope_theta, self.rotary_dim, self.rotary_interleaved
        )
        return rotated.flatten(-2)

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
    ) -> Tuple[Tensor, Optional[Tensor]]:
        batched = query.dim() == 3
        # Everything (N, length, features) here.
        if not batched:
            query, key, value = query[None], key[None], value[None]
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(query, key, value)
        target_len, source_len = q.size(1), k.size(1)
        device = q.device
        query_positions = (
            torch.arange(target_len, device=device) if positions is None else positions
        )
        key_positions = torch.arange(source_len, device=device) if positions is None else positions
        q = self._rotate(q, self.num_heads, query_positions)
        k = self._repeat(self._rotate(k, self.num_kv_heads, key_positions))
        v = self._repeat(v)
        bias_k = None if self.bias_k is None else self._repeat(self.bias_k)
        bias_v = None if self.bias_v is None else self._repeat(self.bias_v)
        if batched:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        else:
            q, k, v = q[0], k[0], v[0]
        identity = torch.eye(self.embed_dim, dtype=q.dtype, device=device)
        output, weights = F.multi_head_attention_forward(
            q,
            k,
            v,
            self.embed_dim,
            self.num_heads,
            None,
            None,
            bias_k,
            bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            use_separate_proj_weight=True,
            q_proj_weight=identity,
            k_proj_weight=identity,
            v_proj_weight=identity,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if batched and self.batch_first:
            output = output.transpose(0, 1)
        return output, weights
