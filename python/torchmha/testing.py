"""The chapter's published multi-head attention and its parameter names, for tests and benchmarks.

``ChapterMultiHeadAttention`` is the class ``MultiHeadAttention`` of "Introduction to NLP with
Transformers", 4.4, verbatim, plus the two lines its ``__init__`` leaves out
(``self.attention`` and ``self.dropout``), defined as BERT-pytorch, which it follows, defines
them. ``Attention`` is BERT-pytorch's ``bert_pytorch/model/attention/single.py``. It is the
reference that ``torchmha.TextbookMultiHeadAttention`` is tested and benchmarked against; nothing
in it is torchmha's own code, and torchmha never calls it.

``textbook_to_pytorch`` and ``pytorch_to_textbook`` convert state dicts between the chapter's
parameter names and ``torch.nn.MultiheadAttention``'s: ``linear_layers.0/1/2`` are the row blocks
(query, key, value) of ``in_proj_weight`` and ``in_proj_bias``; ``output_linear`` is ``out_proj``.
"""

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "ChapterMultiHeadAttention", "pytorch_to_textbook", "textbook_to_pytorch"]


class Attention(nn.Module):
    """Compute 'Scaled Dot Product Attention' (BERT-pytorch)."""

    def forward(self, query, key, value, mask=None, dropout=None):
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(query.size(-1))

        if mask is not None:
            scores = scores.masked_fill(mask == 0, -1e9)

        p_attn = F.softmax(scores, dim=-1)

        if dropout is not None:
            p_attn = dropout(p_attn)

        return torch.matmul(p_attn, value), p_attn


class ChapterMultiHeadAttention(nn.Module):
    """The chapter's ``MultiHeadAttention(h, d_model, dropout)``."""

    def __init__(self, h, d_model, dropout=0.1):
        super().__init__()
        assert d_model % h == 0

        self.d_k = d_model // h
        self.h = h

        self.linear_layers = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(3)])
        self.output_linear = nn.Linear(d_model, d_model)
        self.attention = Attention()
        # Missing from the chapter's listing; BERT-pytorch defines it so.
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, query, key, value, mask=None):
        batch_size = query.size(0)

        query, key, value = [
            l(x).view(batch_size, -1, self.h, self.d_k).transpose(1, 2)
            for l, x in zip(self.linear_layers, (query, key, value))  # noqa: E741 (the chapter's name)
        ]

        x, self.attn = self.attention(query, key, value, mask=mask, dropout=self.dropout)

        x = x.transpose(1, 2).contiguous().view(batch_size, -1, self.h * self.d_k)

        return self.output_linear(x)


def textbook_to_pytorch(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The chapter's names -> ``nn.MultiheadAttention``'s packed parameters."""
    return {
        "in_proj_weight": torch.cat([state[f"linear_layers.{i}.weight"] for i in range(3)]),
        "in_proj_bias": torch.cat([state[f"linear_layers.{i}.bias"] for i in range(3)]),
        "out_proj.weight": state["output_linear.weight"],
        "out_proj.bias": state["output_linear.bias"],
    }


def pytorch_to_textbook(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``nn.MultiheadAttention``'s packed parameters -> the chapter's names."""
    weights = state["in_proj_weight"].chunk(3)
    biases = state["in_proj_bias"].chunk(3)
    converted = {f"linear_layers.{i}.weight": weights[i] for i in range(3)}
    converted.update({f"linear_layers.{i}.bias": biases[i] for i in range(3)})
    converted["output_linear.weight"] = state["out_proj.weight"]
    converted["output_linear.bias"] = state["out_proj.bias"]
    return converted
