"""The chapter's multi-head attention API, as an adapter over the torchmha op."""

from typing import List, Optional

import torch
from torch import Tensor, nn

from torchmha.loading import AllOrNothingLoading
from torchmha.ops import multi_head_attention


def _broadcasts_to(sizes: List[int], target: List[int]) -> bool:
    """Whether a tensor of ``sizes`` broadcasts to ``target`` (trailing dimensions first)."""
    if len(sizes) > len(target):
        return False
    offset = len(target) - len(sizes)
    for dim in range(len(sizes)):
        if sizes[dim] != 1 and sizes[dim] != target[offset + dim]:
            return False
    return True


class TextbookMultiHeadAttention(AllOrNothingLoading):
    """``MultiHeadAttention(h, d_model, dropout)`` of the chapter (after BERT-pytorch).

    Parameters carry the chapter's names (``linear_layers.0/1/2`` and ``output_linear``), so a
    state dict of the chapter's module loads unchanged. ``forward`` takes batch-first
    ``(B, L, d_model)`` inputs and a ``mask`` that is nonzero where attention is allowed and
    broadcasts to ``(B, h, L, S)`` (e.g. ``(B, 1, L, S)`` or ``(B, 1, 1, S)``). The per-head
    probabilities ``(B, h, L, S)`` of the last call are kept in ``attn``. Unlike the chapter's
    ``-1e9`` fill, a query with every key masked attends to nothing (zero output before
    ``output_linear``) and masking is exact in float16.
    """

    attn: Optional[Tensor]

    def __init__(self, h: int, d_model: int, dropout: float = 0.1) -> None:
        super().__init__()
        if h <= 0 or d_model % h != 0:
            raise ValueError(
                f"d_model must be a positive multiple of h, got h={h} and d_model={d_model}"
            )
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.d_k = d_model // h
        self.h = h
        self.dropout_p = dropout
        self.linear_layers = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(3)])
        self.output_linear = nn.Linear(d_model, d_model)
        self.attn = None

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor] = None
    ) -> Tensor:
        """Attend from ``query`` to ``key``/``value``; returns ``(B, L, d_model)``."""
        # Shapes are RuntimeErrors, as the C++ adapter's c10::Error is in Python.
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise RuntimeError(
                "torchmha.TextbookMultiHeadAttention: expected batch-first 3-D `query`, `key` "
                f"and `value` (B, L, d_model), but got {list(query.shape)}, {list(key.shape)} "
                f"and {list(value.shape)}"
            )
        attn_mask: Optional[Tensor] = None
        if mask is not None:
            # Nonzero = may attend, broadcast to (B, h, L, S) -> the op's True = masked (B*h, L, S).
            batch, target_len, source_len = query.size(0), query.size(1), key.size(1)
            if not _broadcasts_to(mask.shape, [batch, self.h, target_len, source_len]):
                raise RuntimeError(
                    "torchmha.TextbookMultiHeadAttention: expected `mask` broadcastable to "
                    f"(B, h, L, S) = ({batch}, {self.h}, {target_len}, {source_len}), but got "
                    f"{list(mask.shape)}"
                )
            attn_mask = (
                (mask == 0)
                .expand(batch, self.h, target_len, source_len)
                .reshape(batch * self.h, target_len, source_len)
            )
        q_proj, k_proj, v_proj = self.linear_layers[0], self.linear_layers[1], self.linear_layers[2]
        output, weights = multi_head_attention(
            query,
            key,
            value,
            self.h,
            None,
            torch.cat([q_proj.bias, k_proj.bias, v_proj.bias]),
            q_proj.weight,
            k_proj.weight,
            v_proj.weight,
            self.output_linear.weight,
            self.output_linear.bias,
            dropout_p=self.dropout_p,
            training=self.training,
            attn_mask=attn_mask,
            need_weights=True,
            average_attn_weights=False,
            batch_first=True,
        )
        self.attn = weights
        return output
