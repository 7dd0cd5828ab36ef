"""Typed Python entry point of the op ``torch.ops.torchmha.multi_head_attention``."""

from typing import Optional, Tuple

import torch
from torch import Tensor


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    in_proj_weight: Optional[Tensor] = None,
    in_proj_bias: Optional[Tensor] = None,
    q_proj_weight: Optional[Tensor] = None,
    k_proj_weight: Optional[Tensor] = None,
    v_proj_weight: Optional[Tensor] = None,
    out_proj_weight: Optional[Tensor] = None,
    out_proj_bias: Optional[Tensor] = None,
    bias_k: Optional[Tensor] = None,
    bias_v: Optional[Tensor] = None,
    add_zero_attn: bool = False,
    dropout_p: float = 0.0,
    training: bool = True,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    need_weights: bool = True,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    batch_first: bool = False,
    num_kv_heads: Optional[int] = None,
    rope_theta: Optional[float] = None,
    rotary_dim: Optional[int] = None,
    rotary_interleaved: bool = False,
    positions: Optional[Tensor] = None,
    cache_key: Optional[Tensor] = None,
    cache_value: Optional[Tensor] = None,
    cache_lengths: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Multi-head attention with ``torch.nn.functional.multi_head_attention_forward``'s semantics.

    Inputs are ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``) or unbatched ``(L, E)``.
    Give either ``in_proj_weight`` ``(E + 2 * kv_dim, E)`` or all of ``q_proj_weight``
    ``(E, E)``, ``k_proj_weight`` ``(kv_dim, kdim)`` and ``v_proj_weight`` ``(kv_dim, vdim)``,
    where ``kv_dim = num_kv_heads * E // num_heads`` (``E`` by default). Boolean masks are
    ``True`` where attention is not allowed; floating masks are added to the scores.

    Grouped-query attention: ``num_kv_heads`` key/value heads (``None``: ``num_heads``; it must
    divide ``num_heads``); query head ``h`` uses key/value head
    ``h // (num_heads // num_kv_heads)``. Rotary embeddings: with ``rope_theta``, the leading
    ``rotary_dim`` features (``None``: all) of each query and key head rotate by
    ``position * rope_theta ** (-2i / rotary_dim)``, after the projections and their biases;
    feature ``i`` pairs with ``i + rotary_dim // 2`` (Llama, GPT-NeoX), or ``2i`` with ``2i + 1``
    with ``rotary_interleaved`` (GPT-J). ``positions`` (integers, ``(L,)`` or ``(N, L)``) gives
    the query tokens' positions, which the keys share; by default queries and keys are at
    ``0, 1, 2, ...``. Keys appended by ``bias_k`` or ``add_zero_attn`` are not rotated.
    ``is_causal=True`` without ``attn_mask`` is causal attention. A query whose keys are all
    masked attends to nothing (zero before the output projection), never NaN.

    Key/value cache (incremental decoding; all three or none, each updated in place):
    ``cache_key`` and ``cache_value`` ``(N, num_kv_heads, max_seq_len, head_dim)`` in the dtype
    of ``query``, holding keys after rotation, and ``cache_lengths`` (int64, ``(N,)``). ``key``
    and ``value`` are the new tokens (the length of ``query``): entry ``b``'s new keys and values
    are written at ``cache_lengths[b] + i`` (their rotary positions too), then the queries attend
    over everything the entry has cached; with ``is_causal``, new token ``i`` sees positions
    ``<= cache_lengths[b] + i``. A bool ``key_padding_mask`` over the new tokens marks right
    padding: each entry advances by its real tokens only. The weights are over the cache's
    ``max_seq_len`` positions, zero beyond each entry's length. Every check runs before anything
    is written; a cache is for inference (refused when an input requires grad in grad mode).

    The arguments are the op schema's, in its order (``torch.ops.torchmha.multi_head_attention``);
    ``out_proj_weight`` is required, and may be given by name after ``in_proj_weight`` and
    ``in_proj_bias``.

    Returns ``(output, weights)``; ``weights`` is ``None`` unless ``need_weights``.
    """
    if out_proj_weight is None:
        # Before 0.2 this function took out_proj_weight and out_proj_bias right after
        # in_proj_bias: such a call lands here, and must not run with its weights misplaced.
        raise TypeError(
            "torchmha.multi_head_attention: `out_proj_weight` is required; the arguments follow "
            "the op's schema: (query, key, value, num_heads, in_proj_weight, in_proj_bias, "
            "q_proj_weight, k_proj_weight, v_proj_weight, out_proj_weight, out_proj_bias, ...) "
            "(out_proj_weight no longer comes right after in_proj_bias)"
        )
    output, weights = torch.ops.torchmha.multi_head_attention(
        query,
        key,
        value,
        num_heads,
        in_proj_weight,
        in_proj_bias,
        q_proj_weight,
        k_proj_weight,
        v_proj_weight,
        out_proj_weight,
        out_proj_bias,
        bias_k,
        bias_v,
        add_zero_attn,
        dropout_p,
        training,
        key_padding_mask,
        attn_mask,
        need_weights,
        average_attn_weights,
        is_causal,
        batch_first,
        num_kv_heads,
        rope_theta,
        rotary_dim,
        rotary_interleaved,
        positions,
        cache_key,
        cache_value,
        cache_lengths,
    )
    if need_weights:
        return output, weights
    return output, None
